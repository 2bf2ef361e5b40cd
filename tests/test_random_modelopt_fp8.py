"""benchmarks/random_modelopt_fp8.py on the CPU: the checkpoint it writes for a tiny Llama config loads as a
ModelOpt FP8 one (every decoder linear e4m3 with its static input scale, lm_head bf16) and decodes."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "random_modelopt_fp8.py"


def test_writes_a_modelopt_fp8_checkpoint(tmp_path, tiny_llama_dir):
    from autodeploy.optimizer import optimize_model

    spec = importlib.util.spec_from_file_location("random_modelopt_fp8", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "fp8"
    written = script.write(Path(tiny_llama_dir), out, "cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == written
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"

    opt = optimize_model(out, overrides=["model.device=cpu", "model.dtype=float32",
                                         "transforms.insert_kv_cache.num_blocks=8"], progress=False)
    matched = next(r.matched for r in opt.reports if r.name == "quantize_from_checkpoint")
    layers = opt.ctx.source.config.num_hidden_layers
    assert sum(v for k, v in matched.items() if k.endswith("_linear")) == 7 * layers
    params = dict(opt.gm.named_parameters())
    assert sum(name.endswith("input_scale") for name in params) == 4 * layers  # q/k/v and gate/up fused
    projections = [p for n, p in params.items() if ".layers." in n and n.endswith("proj.weight")]
    assert len(projections) == 4 * layers and all(p.dtype == torch.float8_e4m3fn for p in projections)
    assert opt.logits(torch.tensor([[3, 17, 42]])).isfinite().all()
