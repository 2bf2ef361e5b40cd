"""benchmarks/recipe_ab.py on the CPU: the tiny Llama, two variants, a line per variant and workload; a variant
without NAME= is a one-line usage error."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_ab.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=SCRIPT.parents[1])


def test_each_variant_is_built_and_timed():
    done = _run("--model", "benchmarks/tiny-llama", "--batch", "1,2", "--input-len", "4", "--output-len", "2",
                "--repeats", "1", "base=", "unfused=transforms.fuse_shared_input_linears.enabled=false")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split() for line in done.stdout.splitlines() if "tok/s" in line]
    assert [(line[0], line[2]) for line in lines] == [("base", "b=1"), ("base", "b=2"), ("unfused", "b=1"),
                                                      ("unfused", "b=2")]
    assert all(float(line[5]) > 0 for line in lines)


def test_a_variant_needs_a_name():
    done = _run("quantization.algo")
    assert done.returncode == 2 and "a variant is NAME=override,override" in done.stderr.splitlines()[-1]
