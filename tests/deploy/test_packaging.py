"""The one namespace: run from the checkout's root (where `python -m` and pytest put it on sys.path),
no folder of the project shadows an installed distribution, and the wheel's package list covers every
source folder (deploy/fresh_install_check.sh installs that wheel in CI)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = ("router", "prefill_worker", "decode_worker", "shared", "kernels")


def test_transformers_imports_from_the_checkout_root():
    """transformers >= 5.25 imports Hugging Face's `kernels` package; a regular package named
    kernels/ at the root (as this project had) made this fail with an ImportError."""
    code = ("from transformers import Glm4MoeForCausalLM, Glm4MoeLiteForCausalLM; import kernels, glmserve.kernels; "
            "print(getattr(kernels, '__file__', None)); print(glmserve.kernels.__path__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf_file, ours = proc.stdout.splitlines()
    assert not (hf_file or "").startswith(REPO + os.sep + "kernels")  # never our folder
    assert os.path.join(REPO, "kernels") in ours


def test_no_top_level_folder_shadows_an_installed_distribution():
    installed = {name for name, dists in importlib.metadata.packages_distributions().items() if set(dists) != {"glmserve"}}
    for name in sorted(os.listdir(REPO)):
        path = os.path.join(REPO, name)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            assert name not in installed, f"{name}/ is a regular package and shadows the installed {name!r}"
    for name in SOURCE:
        assert not os.path.exists(os.path.join(REPO, name, "__init__.py")), f"{name}/ must stay a namespace portion"


def test_wheel_package_list_covers_every_source_folder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("glmserve_setup", os.path.join(REPO, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # computes the lists; setup() runs only as __main__
    packages, package_dir = mod.PACKAGES, mod.PACKAGE_DIR
    for top in SOURCE:
        assert package_dir[f"glmserve.{top}"] == top
        for dirpath, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if any(f.endswith(".py") for f in files):
                rel = os.path.relpath(dirpath, REPO).replace(os.sep, ".")
                assert f"glmserve.{rel}" in packages, rel
