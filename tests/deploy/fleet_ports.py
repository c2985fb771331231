"""Free port blocks for a test fleet (router port, port_base .. +21, health_base .. +11) on 127.0.0.1."""

import random
import socket


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def fleet_ports() -> tuple[int, int, int]:
    """(router port, port_base, health_base), every port of the blocks free right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 40000, 100)
        port, port_base, health_base = base, base + 10, base + 50
        ports = [port] + list(range(port_base, port_base + 22)) + list(range(health_base, health_base + 12))
        if all(_free(p) for p in ports):
            return port, port_base, health_base
    raise RuntimeError("no free port block")


def cached_default_model() -> str:
    """The embedded default model, written once per content of the code that makes it (shared by fleet tests).

    Keyed by a hash of deploy/default_model.py, shared/weights/tiny.py and shared/tokenizer/builtin.py, so a
    change to any of them writes a fresh one; the write itself is atomic (ensure_default_model).
    """
    import hashlib
    import os
    import tempfile

    from glmserve.deploy.default_model import ensure_default_model

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    h = hashlib.sha256()
    for rel in ("glmserve/deploy/default_model.py", "shared/weights/tiny.py", "shared/tokenizer/builtin.py",
                "shared/tokenizer/corpus.py", "shared/tokenizer/templates.py"):
        with open(os.path.join(repo, rel), "rb") as f:
            h.update(f.read())
    root = os.path.join(tempfile.gettempdir(), f"glmserve-test-model-{os.getuid()}-{h.hexdigest()[:16]}")
    return ensure_default_model(root)


def seed_state_dir(state_dir: str) -> None:
    """Put the cached default model where `deploy up` (no --model_dir) looks for it."""
    import os

    os.makedirs(state_dir, exist_ok=True)
    os.symlink(cached_default_model(), os.path.join(state_dir, "default_model"))
