"""Named graph transforms. Importing this package registers every built-in transform."""

from .registry import TRANSFORMS, Stage, Transform, TransformConfig, TransformContext, TransformReport, register

__all__ = ["TRANSFORMS", "Stage", "Transform", "TransformConfig", "TransformContext", "TransformReport", "register"]

from . import load_weights  # noqa: E402,F401  (registers the transform)
from . import shard_tensor_parallel  # noqa: E402,F401  (sharding stage: tensor / expert parallel)
from . import match_attention, match_gated_mlp, match_linear, match_rms_norm, match_rope  # noqa: E402,F401
from . import match_moe  # noqa: E402,F401
from . import match_causal_conv  # noqa: E402,F401  (short causal conv1d of SSM / hybrid layers)
from . import quantize_from_checkpoint, quantize_linear  # noqa: E402,F401  (quantization stage)
from . import insert_kv_cache  # noqa: E402,F401  (paged KV cache, packed-batch interface)
from . import insert_state_cache  # noqa: E402,F401  (per-sequence state slots of SSM / linear-attention ops)
from . import fuse_rope_attention  # noqa: E402,F401  (cache stage: RoPE inside the cached attention)
from . import fuse_attention_quant_fp8  # noqa: E402,F401  (cache stage: FP8 o input quantized in the attention)
from . import gather_lm_head_rows  # noqa: E402,F401  (cache stage: logits of the sampled rows only)
from . import fuse_cleanup_noops, fuse_linears, fuse_add_rms_norm, fuse_select_backends  # noqa: E402,F401  (fusion stage)
from . import fuse_rope_pairs  # noqa: E402,F401  (fusion stage: q and k rotated in one launch)
from . import fuse_fp8_act_quant  # noqa: E402,F401  (fusion stage: FP8 activations quantized once, in the RMSNorm)
from . import fuse_gated_linear  # noqa: E402,F401  (fusion stage: the gated activation inside the down projection)
from . import fuse_norm_linear  # noqa: E402,F401  (fusion stage: residual add + RMSNorm inside the next projection)
from . import use_int4_tinygemm  # noqa: E402,F401  (fusion stage, after select_backends: INT4 decode on tinygemm)
from . import use_int_gemv  # noqa: E402,F401  (fusion stage, after use_int4_tinygemm: the other INT linears' GEMV)
