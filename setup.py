"""Package layout (the rest of the metadata is in pyproject.toml).

The source folders keep the project's fixed top-level layout (router/, prefill_worker/, decode_worker/,
shared/, kernels/) but install as subpackages of the one namespace `glmserve` (glmserve.router, ...).
Those top-level folders have no __init__.py: from the checkout's root they are at most PEP 420 namespace
portions, which never shadow an installed regular package of the same name (Hugging Face's `kernels`,
which transformers imports). In a checkout, glmserve/__init__.py adds the root to glmserve.__path__.
"""
from setuptools import find_namespace_packages, setup

SOURCE_FOLDERS = ("router", "prefill_worker", "decode_worker", "shared", "kernels")


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = ["glmserve", "glmserve.deploy"]
    package_dir = {"glmserve": "glmserve"}
    for top in SOURCE_FOLDERS:
        package_dir[f"glmserve.{top}"] = top
        subs = [p for p in find_namespace_packages(top) if "__pycache__" not in p and not p.startswith(".")]
        packages += [f"glmserve.{top}"] + [f"glmserve.{top}.{p}" for p in subs]
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()
if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import the lists
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
