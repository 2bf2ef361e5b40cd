"""The Triton backends compiled on a GPU: bf16 at real shapes against float64 references, and timed
against the unfused torch code they replace.

`pytest -m gpu tests/test_triton_kernels_gpu.py` checks; `python tests/test_triton_kernels_gpu.py
OUT_DIR` checks, then times each kernel (triton.testing.do_bench, median, and the same under a CUDA
graph, which leaves out launch gaps) and writes OUT_DIR/triton_kernels.json plus a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import autodeploy.kernels  # noqa: F401

ops = torch.ops.autodeploy
HIDDEN, INTER, N_HEADS, HEAD_DIM = 4096, 14336, 32, 128  # Llama-3-8B
TOKENS = [1, 8, 32, 128, 512]


def _cases(tokens: int) -> dict[str, tuple[Callable, Callable, tuple]]:
    """name -> (triton backend, unfused torch equivalent, bf16 args) at `tokens` tokens."""
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=bf16)
    residual = torch.randn_like(x)
    w = torch.rand(HIDDEN, device=dev, dtype=bf16) + 0.5
    gate, up = torch.randn(tokens, 2 * INTER, device=dev, dtype=bf16).chunk(2, dim=-1)  # fused gate_up output
    qkv = torch.randn(1, tokens, 3 * HIDDEN, device=dev, dtype=bf16)
    q = qkv[..., :HIDDEN].view(1, tokens, N_HEADS, HEAD_DIM).transpose(1, 2)
    k = qkv[..., HIDDEN:HIDDEN + HIDDEN // 4].view(1, tokens, N_HEADS // 4, HEAD_DIM).transpose(1, 2)
    angles = torch.rand(1, 1, tokens, HEAD_DIM // 2, device=dev) * 6.28
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(bf16) for f in (torch.cos, torch.sin))
    heads = qkv[..., :HIDDEN].view(1, tokens, N_HEADS, HEAD_DIM)  # Qwen3's per-head norm input, read in place
    head_w = w[:HEAD_DIM]

    def add_then_norm(a, b, weight, eps):
        added = a + b
        return ops.rms_norm(added, weight, eps), added

    return {
        "rms_norm": (ops.rms_norm_triton, ops.rms_norm, (x, w, 1e-6)),
        "fused_add_rms_norm": (ops.fused_add_rms_norm_triton, add_then_norm, (x, residual, w, 1e-6)),
        "silu_and_mul": (ops.gated_act_triton, lambda g, u, act: F.silu(g) * u, (gate, up, "silu")),
        "gelu_tanh_and_mul": (ops.gated_act_triton, lambda g, u, act: F.gelu(g, approximate="tanh") * u,
                              (gate, up, "gelu_tanh")),
        "rope": (ops.rope_triton, ops.rope, (q, cos, sin, False)),
        "rope_interleaved": (ops.rope_triton, ops.rope, (q, cos, sin, True)),
        "rope_pair": (ops.rope_pair_triton, ops.rope_pair, (q, k, cos, sin, False)),
        "rms_norm_per_head": (ops.rms_norm_triton, ops.rms_norm, (heads, head_w, 1e-6)),
        "rope_float32_rotation": (ops.rope_triton, ops.rope, (q, cos.float(), sin.float(), False)),  # OLMo 2
    }


def _poisoned(fn: Callable, args: tuple):
    """fn(*args) with every fresh allocation NaN-filled first (catches unwritten output elements)."""
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: empty(*a, **k).fill_(float("nan"))
    torch.empty_like = lambda *a, **k: empty_like(*a, **k).fill_(float("nan"))
    try:
        return fn(*args)
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def relative_error(kernel: Callable, reference: Callable, args: tuple) -> float:
    """Largest ||kernel - ref|| / ||ref|| over the outputs, ref in float64; NaN anywhere fails."""
    got = _poisoned(kernel, args)
    want = reference(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
    return max(float("inf") if g.isnan().any() else ((g.double() - w).norm() / w.norm()).item() for g, w in pairs)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", TOKENS)
def test_bf16_real_shapes(tokens):
    for name, (kernel, reference, args) in _cases(tokens).items():
        assert relative_error(kernel, reference, args) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_bf16_rope_is_hf_bit_for_bit(interleaved):
    """The rope kernel rounds as eager does (each bf16 product, then the sum): the same bits as the reference."""
    args = _cases(128)["rope_pair"][2]
    q, k, cos, sin, _ = args
    got = ops.rope_pair_triton(q, k, cos, sin, interleaved)
    want = ops.rope_pair(q, k, cos, sin, interleaved)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def fused_graph_agreement(tmp_dir: Path) -> dict:
    """A random-weight Llama through the default recipe on CUDA (fusions on, Triton backends by
    default) against the same recipe with every fusion off: relative logits error, argmax agreement."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from autodeploy.optimizer import optimize_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_dir)
    base = ["model.device=cuda", "model.dtype=bfloat16", "transforms.insert_kv_cache.num_blocks=64"]
    unfused = [f"transforms.{t}.enabled=false"
               for t in ("cleanup_noops", "fuse_shared_input_linears", "fuse_add_rms_norm", "fuse_rope_pairs",
                         "fuse_gated_linear", "fuse_norm_linear", "select_backends")]
    fused, plain = (optimize_model(tmp_dir, overrides=base + extra, progress=False) for extra in ([], unfused))
    ids = torch.randint(0, config.vocab_size, (2, 77), device="cuda")
    got, want = fused.logits(ids).double(), plain.logits(ids).double()
    return {"backends": next(r.matched for r in fused.reports if r.name == "select_backends"),
            "rel_logits_error": ((got - want).norm() / want.norm()).item(),
            "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).double().mean().item()}


@pytest.mark.gpu
def test_fused_graph_agrees_with_unfused(tmp_path):
    result = fused_graph_agreement(tmp_path)
    assert result["rel_logits_error"] < 2e-2 and result["argmax_agreement"] > 0.95, result


def _time(fn: Callable, args: tuple) -> tuple[float, float]:
    """(eager median ms, CUDA-graph ms)."""
    import triton.testing

    fn(*args)
    eager = triton.testing.do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median")
    graph = triton.testing.do_bench_cudagraph(lambda: fn(*args), rep=200, return_mode="median")
    return eager, graph


def main(out_dir: Path) -> None:
    rows = []
    for tokens in TOKENS:
        for name, (kernel, unfused, args) in _cases(tokens).items():
            error = relative_error(kernel, unfused, args)
            (t_eager, t_graph), (u_eager, u_graph) = _time(kernel, args), _time(unfused, args)
            rows.append({"kernel": name, "tokens": tokens, "rel_error_vs_fp64": error,
                         "triton_ms": t_eager, "torch_ms": u_eager, "triton_graph_ms": t_graph,
                         "torch_graph_ms": u_graph})
    out_dir.mkdir(parents=True, exist_ok=True)
    agreement = fused_graph_agreement(Path("/tmp/fused_graph_llama"))
    print("fused graph vs unfused:", agreement)
    (out_dir / "triton_kernels.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows, "fused_graph": agreement}, indent=1))
    header = f"{'kernel':<20}{'tokens':>7}{'rel_err':>10}{'triton':>9}{'torch':>9}{'x':>6}{'tri(g)':>9}{'tor(g)':>9}{'x(g)':>6}"
    lines = [header] + [
        f"{r['kernel']:<20}{r['tokens']:>7}{r['rel_error_vs_fp64']:>10.1e}{r['triton_ms'] * 1e3:>8.1f}u"
        f"{r['torch_ms'] * 1e3:>8.1f}u{r['torch_ms'] / r['triton_ms']:>6.2f}{r['triton_graph_ms'] * 1e3:>8.1f}u"
        f"{r['torch_graph_ms'] * 1e3:>8.1f}u{r['torch_graph_ms'] / r['triton_graph_ms']:>6.2f}" for r in rows
    ]
    (out_dir / "triton_kernels.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
