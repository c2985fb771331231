"""The fleet key: one 32-byte secret per fleet that authenticates every ZeroMQ control message.

Every process of a fleet (router, worker leaders) reads the same key, from the file named by
GLMSERVE_FLEET_KEY_FILE (written 0600 by `deploy up`, or by `write_fleet_key` for a hand-made
fleet), or from GLMSERVE_FLEET_KEY (hex; for tests and containers' secret env). The file must not
be readable by group or others. No key: the process refuses to start (one line saying how).
"""
from __future__ import annotations

import functools
import os
import secrets
import stat

ENV_FILE = "GLMSERVE_FLEET_KEY_FILE"
ENV_HEX = "GLMSERVE_FLEET_KEY"
KEY_BYTES = 32


class FleetKeyError(RuntimeError):
    pass


def write_fleet_key(path: str) -> str:
    """Write a fresh random key to `path` (mode 0600, replacing any) and return the path."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    os.replace(tmp, path)
    return path


def _parse(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise FleetKeyError(f"{where} is not a hex key") from None
    if len(key) < 16:
        raise FleetKeyError(f"{where} holds {len(key)} bytes; a fleet key has at least 16")
    return key


@functools.cache
def fleet_key() -> bytes:
    """This process's fleet key (read once)."""
    path = os.environ.get(ENV_FILE)
    if path:
        try:
            mode = os.stat(path).st_mode
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise FleetKeyError(f"cannot read the fleet key {ENV_FILE}={path}: {e}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise FleetKeyError(f"the fleet key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                                f"chmod 600 {path}")
        return _parse(text, path)
    if os.environ.get(ENV_HEX):
        return _parse(os.environ[ENV_HEX], ENV_HEX)
    raise FleetKeyError(f"no fleet key: set {ENV_FILE} to a 0600 file holding a hex key (`python -m glmserve.deploy "
                        f"up` writes one; or python -c 'from glmserve.shared.fleet_key import write_fleet_key; "
                        f"write_fleet_key(\"fleet.key\")'), or {ENV_HEX} to the hex key")
