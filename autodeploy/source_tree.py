"""Keep a source checkout's root off sys.path, where its top-level packages would shadow others by name."""

import sys
from pathlib import Path


def keep_checkout_root_off_path() -> None:
    """The checkout's top-level kernels/ (installed as autodeploy.kernels) shadows Hugging Face's `kernels`
    package, which transformers >= 5.25 requires and imports, whenever the checkout's root is on sys.path:
    `python -m autodeploy` or `python -m pytest` run from it put it there, and transformers then fails with
    "cannot import name 'CUDAProperties' from 'kernels'". The installed autodeploy never needs the root (its
    packages are mapped by the install), so the root is dropped from sys.path; an installed wheel has no
    checkout, and nothing changes."""
    root = Path(__file__).resolve().parent.parent
    if (root / "kernels" / "__init__.py").is_file() and (root / "pyproject.toml").is_file():
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
