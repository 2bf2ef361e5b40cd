"""OpenAI's MXFP4 checkpoints (quant_method 'mxfp4': openai/gpt-oss-20b and -120b).

Only the routed experts are stored in MXFP4 (`gate_up_proj_blocks` / `_scales`, `down_proj_blocks` / `_scales`:
e2m1 codes two to a byte, one e8m0 scale per 32 values); every linear is bf16. No kernel here reads MXFP4 yet, so
`load_weights` lets transformers dequantize the experts to the model dtype as it loads the checkpoint
(`Mxfp4Config(dequantize=True)`, its CPU path) and the experts run as bf16 `autodeploy::moe` (`swigluoai`): the
weights read per token are then 4x MXFP4's.
"""

from __future__ import annotations

from .checkpoint import CheckpointFormat
from .schemes import LinearScheme


class Mxfp4Format(CheckpointFormat):
    method = "mxfp4"
    dequantized_on_load = True  # transformers turns the experts into the model dtype (module doc)

    def scheme_for(self, path: str) -> LinearScheme | None:
        return None  # the linears are stored unquantized
