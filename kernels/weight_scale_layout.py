"""A weight's FP8 scale laid out as cuBLASLt's scaled GEMMs read it, made once per weight instead of once per call.

Row-wise scaling reads the weight's scale as [1, N] float32, 1 x 128 block scaling as [K / 128, N] (contiguous: stride 1
along N). A per-tensor scale, a per-channel one repeated over K blocks, or 128 x 128 block scales repeated over their
rows, has to be expanded into that, and doing it
in every call ran a copy kernel per GEMM: on an H200 at batch 64 (Llama-3.1-8B shape, group-128 activation scales)
three per layer of ~1.8 us each, with the activation scales' transposes 8 % of a decode step (BENCHMARKS.md, session
17). The expansion depends only on the weight's scale, so it is kept per scale tensor, checked by identity and version
(an in-place update of the scale makes it again). Nothing is stored while a CUDA graph is being captured (the
allocation would come from the graph's private pool): autodeploy/runtime/cuda_graphs.py runs each bucket twice before
capturing it, which fills the cache, and a miss during a capture just expands inside the graph as before.
"""

from __future__ import annotations

import weakref

import torch

_LAYOUTS: dict[tuple[int, int, int], tuple[weakref.ref, int, torch.Tensor]] = {}


def weight_scale_layout(weight_scale: torch.Tensor, blocks: int, n: int, group: int = 128) -> torch.Tensor:
    """weight_scale ([N] per channel, one value, or [N / group, blocks] per group x group block of the weight) as a
    contiguous float32 [blocks, N]."""
    key = (id(weight_scale), blocks, n)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is weight_scale and hit[1] == weight_scale._version:
        return hit[2]
    if weight_scale.dim() == 2:
        layout = weight_scale.float().t().repeat_interleave(group, dim=1)[:, :n].contiguous()
    else:
        layout = weight_scale.float().reshape(1, -1).expand(blocks, n).contiguous()
    if layout.data_ptr() == weight_scale.data_ptr():  # a float32 per-channel scale in one block: a view, no copy
        return layout
    if not (layout.is_cuda and torch.cuda.is_current_stream_capturing()):
        ref = weakref.ref(weight_scale, lambda _, key=key: _LAYOUTS.pop(key, None))
        _LAYOUTS[key] = (ref, weight_scale._version, layout)
    return layout
