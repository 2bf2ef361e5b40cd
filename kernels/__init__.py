"""Canonical custom ops, `torch.ops.autodeploy.*`. Importing this package registers all of them.

Each op has a plain-torch reference implementation (the ground truth; runs on CPU) and a fake
implementation for export / meta-device shape propagation.

Registration happens only under the package's installed name. With the repository root on sys.path
(`python -m pytest` from the root) this folder is also importable as a top-level `kernels`, and
transformers imports any `kernels` it finds to probe for the hub-kernels package: registering
again there would replace the ops under existing graphs' feet (new OpOverload objects).
"""

if __name__ == "autodeploy.kernels":
    from . import attention, gated_act, linear, rms_norm, rope  # noqa: F401
    from . import moe  # noqa: E402,F401  (routed experts of MoE blocks)
    from . import cached_attention  # noqa: E402,F401  (paged attention over packed batches)
    from . import fused_add_rms_norm  # noqa: E402,F401  (residual add + RMSNorm, made by fuse_add_rms_norm)
    from . import gated_linear  # noqa: E402,F401  (gated activation + down projection, made by fuse_gated_linear)
    from . import add_rms_norm_linear  # noqa: E402,F401  (residual add + RMSNorm + projection: fuse_norm_linear)
    from . import quant_linear  # noqa: E402,F401  (fp8_linear, int_linear: formats in quant_format.py)
    from . import quant_act  # noqa: E402,F401  (FP8 activations quantized where produced: fuse_fp8_act_quant)
    from . import cached_attention_quant  # noqa: E402,F401  (attention output quantized: fuse_attention_quant_fp8)
    from . import quant_moe  # noqa: E402,F401  (fp8_moe, int_moe: moe with quantized experts)
    from . import collectives  # noqa: E402,F401  (all_reduce of tensor-parallel graphs)
    from . import ssm  # noqa: E402,F401  (causal conv1d, selective / SSD scans, gated delta rule; cached forms)
    from . import triton_backends  # noqa: E402,F401  (<op>_triton backends, chosen by select_backends)
    from . import int4_tinygemm  # noqa: E402,F401  (INT4 decode through tinygemm: use_int4_tinygemm)
    from . import int_gemv_linear  # noqa: E402,F401  (INT8 / INT4 decode through the interleaved GEMV: use_int_gemv)
