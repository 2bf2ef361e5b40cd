"""Fusion-stage transforms: cleanup_noops, fuse_shared_input_linears, fuse_add_rms_norm, fuse_rope_pairs,
fuse_gated_linear, fuse_norm_linear, select_backends. Unit graphs for what each leaves alone; a tiny Llama for
counts, parameters and logits equal to the unfused graph (float32 and bf16), also through the Triton backends
(interpreter)."""

import pytest
import torch
from torch import nn

from autodeploy.graph_utils import finalize
from autodeploy.optimizer import optimize_model
from autodeploy.transforms import TRANSFORMS
from autodeploy.transforms.fuse_select_backends import resolve_backend

from runtime_helpers import NO_CACHE

FUSIONS = ["cleanup_noops", "fuse_shared_input_linears", "fuse_add_rms_norm", "fuse_rope_pairs", "fuse_gated_linear",
           "fuse_norm_linear", "select_backends"]
UNFUSED = [f"transforms.{name}.enabled=false" for name in FUSIONS]
TRITON = [f"transforms.select_backends.backends.{op}=triton"
          for op in ("rms_norm", "fused_add_rms_norm", "gated_act", "rope", "rope_pair", "gated_linear",
                     "add_rms_norm_linear")]
linear = torch.ops.autodeploy.linear.default
ADD_NORM = torch.ops.autodeploy.fused_add_rms_norm.default
ADD_NORM_LINEAR = torch.ops.autodeploy.add_rms_norm_linear.default


def cpu(dtype: str) -> list[str]:
    """CPU overrides, with the prologue fusions (off in the default recipe: slower on the GPU so far) on."""
    return ["model.device=cpu", f"model.dtype={dtype}", "transforms.fuse_gated_linear.enabled=true",
            "transforms.fuse_norm_linear.enabled=true"]


def matched(opt, name: str) -> dict[str, int]:
    return next(r.matched for r in opt.reports if r.name == name)


def count(opt, op) -> int:
    return sum(n.op == "call_function" and n.target == op for n in opt.gm.graph.nodes)


@pytest.fixture(scope="module")
def unfused(tiny_llama_dir):
    return optimize_model(tiny_llama_dir, overrides=cpu("float32") + [NO_CACHE] + UNFUSED, progress=False)


@pytest.fixture(scope="module")
def fused(tiny_llama_dir):
    return optimize_model(tiny_llama_dir, overrides=cpu("float32") + [NO_CACHE], progress=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


def test_reports_on_tiny_llama(fused):
    assert matched(fused, "fuse_shared_input_linears") == {"qkv": 2, "gate_up": 2, "other": 0}
    assert matched(fused, "fuse_add_rms_norm") == {"fused_add_rms_norm": 4}  # every norm but the first
    assert matched(fused, "fuse_rope_pairs") == {"rope_pair": 2}  # q and k of each layer
    assert not any(n.target == torch.ops.autodeploy.rope.default for n in fused.gm.graph.nodes)
    assert matched(fused, "fuse_gated_linear") == {"gated_linear": 2}  # each layer's down projection
    assert count(fused, torch.ops.autodeploy.gated_linear.default) == 2
    assert count(fused, torch.ops.autodeploy.gated_act.default) == 0
    # q/k/v and gate/up of each layer but layer 0's q/k/v (its norm has no residual add); not the LM head
    assert matched(fused, "fuse_norm_linear") == {"add_rms_norm_linear": 3}
    assert count(fused, ADD_NORM_LINEAR) == 3 and count(fused, ADD_NORM) == 1
    assert matched(fused, "cleanup_noops")["alias"] == 1 and matched(fused, "cleanup_noops")["cast"] > 0
    assert matched(fused, "select_backends")["rms_norm_torch"] == 1  # auto on CPU: the references
    assert all(not r.warnings for r in fused.reports)
    fused.gm.graph.lint()


def test_fused_parameters_replace_the_old_ones(fused, unfused):
    before, after = dict(unfused.gm.named_parameters()), dict(fused.gm.named_parameters())
    assert not {n.split(".")[-2] for n in after} & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    prefix = "model.model.layers.0."
    qkv = [before[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"]
    torch.testing.assert_close(after[f"{prefix}self_attn.q_k_v_proj.weight"], torch.cat(qkv), rtol=0, atol=0)
    assert after[f"{prefix}mlp.gate_up_proj.weight"].shape == (256, 64)
    assert sum(p.numel() for p in after.values()) == sum(p.numel() for p in before.values())


def test_fused_logits_equal_unfused(fused, unfused, ids):
    torch.testing.assert_close(fused.logits(ids), unfused.logits(ids), atol=1e-5, rtol=1e-5)


def test_triton_backends_with_kv_cache(tiny_llama_dir, unfused, ids):
    """The whole default recipe with every Triton backend (interpreted) and the paged cache."""
    opt = optimize_model(tiny_llama_dir, overrides=cpu("float32") + TRITON + ["transforms.insert_kv_cache.num_blocks=16"],
                         progress=False)
    assert matched(opt, "select_backends")["add_rms_norm_linear_triton"] == 3  # every fused_add_rms_norm but the
    assert matched(opt, "select_backends")["fused_add_rms_norm_triton"] == 1  # final one (LM head)
    assert matched(opt, "select_backends")["rope_pair_triton"] == 2
    assert matched(opt, "select_backends")["gated_linear_triton"] == 2  # on CPU: gated_act's kernel, then torch
    assert matched(opt, "fuse_rope_attention") == {"rope_in_attention": 2}  # the pairs went into the attention
    assert count(opt, torch.ops.autodeploy.rope_pair_triton.default) == 0
    torch.testing.assert_close(opt.logits(ids), unfused.logits(ids), atol=1e-4, rtol=1e-4)


def test_rope_in_attention_decodes_as_before(tiny_llama_dir):
    """Greedy tokens of a batch (prefill, then decode steps on the decode kernel, interpreted) with RoPE inside the
    Triton cached attention equal those with the separate rope_pair op."""
    from autodeploy import LLM, SamplingParams

    prompts, params = [[1, 5, 9, 200, 31, 7, 99], [4, 8, 15], [250, 3]], SamplingParams(max_tokens=5, temperature=0.0)
    runtime = dict(max_batch_size=4, max_num_tokens=64, **{"transforms.insert_kv_cache.num_blocks": 16,
                                                             "transforms.insert_kv_cache.backend": "triton"})
    outs = []
    for enabled in (True, False):
        llm = LLM(tiny_llama_dir, overrides=[f"transforms.fuse_rope_attention.enabled={enabled}"], **runtime)
        folded = [n for n in llm.model.gm.graph.nodes if n.kwargs.get("rope_cos") is not None]
        assert len(folded) == (2 if enabled else 0)
        outs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert outs[0] == outs[1]


def test_bf16_fused_logits_close_to_unfused(tiny_llama_dir, ids):
    """bf16 exports carry real casts around the norms; the fusions must still find every site."""
    a = optimize_model(tiny_llama_dir, overrides=cpu("bfloat16") + [NO_CACHE], progress=False)
    b = optimize_model(tiny_llama_dir, overrides=cpu("bfloat16") + [NO_CACHE] + UNFUSED, progress=False)
    assert matched(a, "fuse_add_rms_norm") == {"fused_add_rms_norm": 4}
    assert matched(a, "fuse_norm_linear") == {"add_rms_norm_linear": 3}
    assert matched(a, "fuse_shared_input_linears")["qkv"] == 2
    got, want = a.logits(ids).double(), b.logits(ids).double()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_gated_linear_leaves_fp8_models_alone(tiny_llama_dir):
    """FP8 down projections read the activation quantized where it is made (gated_act_quant_fp8): no plain linear."""
    opt = optimize_model(tiny_llama_dir, overrides=cpu("float32") + [NO_CACHE, "quantization.algo=fp8"], progress=False)
    report = next(r for r in opt.reports if r.name == "fuse_gated_linear")
    assert report.matched == {"gated_linear": 0} and report.nodes_before == report.nodes_after
    assert count(opt, torch.ops.autodeploy.gated_act_quant_fp8.default) == 2
    assert count(opt, torch.ops.autodeploy.gated_linear.default) == 0


@pytest.mark.parametrize("algo,norm_op", [("fp8", torch.ops.autodeploy.fused_add_rms_norm_quant_fp8.default),
                                           ("int4", ADD_NORM)])
def test_norm_linear_leaves_quantized_linears_alone(tiny_llama_dir, algo, norm_op):
    """The layers' norms feed quantized linears (FP8: quantized inside the norm already) and stay as they are; the
    final norm feeds the unquantized LM head, which is never fused."""
    opt = optimize_model(tiny_llama_dir, overrides=cpu("float32") + [NO_CACHE, f"quantization.algo={algo}"],
                         progress=False)
    report = next(r for r in opt.reports if r.name == "fuse_norm_linear")
    assert report.matched == {"add_rms_norm_linear": 0} and report.nodes_before == report.nodes_after
    assert count(opt, norm_op) == (3 if algo == "fp8" else 4)  # FP8: the final norm's stays unquantized


class NormReaders(nn.Module):
    """A residual add + RMSNorm whose normalized row has two readers: no linear can take the norm over."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj = nn.Parameter(torch.rand(8) + 0.5), nn.Linear(8, 4)

    def forward(self, x, residual):
        out = ADD_NORM(x, residual, self.norm, 1e-6)
        return linear(out[0], self.proj.weight, self.proj.bias), out[0] * 2, out[1]


def test_norm_linear_needs_the_only_reader():
    gm = torch.fx.symbolic_trace(NormReaders())
    assert TRANSFORMS["fuse_norm_linear"]().apply(gm, None) == {"add_rms_norm_linear": 0}
    assert sum(n.target == ADD_NORM for n in gm.graph.nodes) == 1


class Projections(nn.Module):
    """Three readers of x: two with bias (fusable together), one without; one more reads a tied weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(8, 6), nn.Linear(8, 5, bias=False)
        self.tied, self.head = nn.Linear(8, 3, bias=False), nn.Linear(8, 3, bias=False)
        self.head.weight = self.tied.weight

    def forward(self, x):
        outs = [linear(x, m.weight, m.bias) for m in (self.a, self.b, self.c, self.tied)]
        return [*outs, linear(x, self.head.weight)]


def test_shared_input_linears_group_by_bias_and_skip_tied_weights():
    gm = torch.fx.symbolic_trace(Projections())
    x = torch.randn(3, 8)
    want = gm(x)
    counts = TRANSFORMS["fuse_shared_input_linears"]().apply(gm, None)
    finalize(gm)
    assert counts == {"qkv": 0, "gate_up": 0, "other": 1}
    assert sorted(n for n, _ in gm.named_parameters() if "_proj" in n) == ["a_b_proj.bias", "a_b_proj.weight"]
    for g, w in zip(gm(x), want):
        torch.testing.assert_close(g, w)


class Noops(nn.Module):
    def forward(self, x):
        y = x.to(torch.float32).reshape(x.shape).contiguous()  # three no-ops on a float32 input
        kept = x.t().contiguous().to(torch.float16)  # a real copy and a real cast
        return torch.ops.aten.alias(y) + 1, kept


def test_cleanup_noops_keeps_real_copies_and_casts():
    gm = torch.export.export(Noops(), (torch.randn(4, 6),)).module()
    counts = TRANSFORMS["cleanup_noops"]().apply(gm, None)
    finalize(gm)
    assert counts["alias"] == 1 and counts["cast"] == 1 and counts["view"] >= 1 and counts["contiguous"] <= 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert any("_to_copy" in str(t) or "to.dtype" in str(t) for t in targets)  # the float16 cast stays
    x = torch.randn(4, 6)
    y, kept = gm(x)
    torch.testing.assert_close(y, x + 1)
    assert kept.dtype == torch.float16 and kept.shape == (6, 4)


def test_resolve_backend():
    cuda, host = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("rope", "auto", cuda) == "triton" and resolve_backend("rope", "auto", host) == "torch"
    assert resolve_backend("attention", "auto", cuda) == "torch"  # no Triton backend (yet)
    with pytest.raises(ValueError, match="no backend 'cuda'"):
        resolve_backend("rms_norm", "cuda", host)
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        resolve_backend("softmax", "torch", host)
