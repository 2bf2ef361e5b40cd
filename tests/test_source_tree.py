"""Run from the checkout's root, `import autodeploy` keeps the root's kernels/ from shadowing HF's `kernels`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIND = "import autodeploy, importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)"


def test_checkout_kernels_do_not_shadow_hf_kernels():
    """`python -c` from the root puts the root first on sys.path (as `python -m autodeploy` does); after
    `import autodeploy` the name `kernels` no longer finds the checkout's kernels/ (transformers >= 5.25 imports
    Hugging Face's `kernels` package by that name), while autodeploy.kernels still imports."""
    found = subprocess.run([sys.executable, "-c", FIND], cwd=ROOT, capture_output=True, text=True, check=True)
    assert not found.stdout.strip().startswith(str(ROOT / "kernels")), found.stdout
    mapped = subprocess.run([sys.executable, "-c", "import autodeploy.kernels.triton_pdl"], cwd=ROOT,
                            capture_output=True, text=True)
    assert mapped.returncode == 0, mapped.stderr
