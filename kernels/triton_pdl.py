"""Programmatic dependent launch (PDL) for the Triton kernels: overlap each kernel's launch with the tail
of the one before it.

A decode step at batch 1 is ~350 short kernels in a row (4 GEMMs and 7 small kernels per layer), each
of which normally starts only after its predecessor has drained. On Hopper (sm_90+) a kernel launched
with the PDL attribute may be scheduled while its predecessor still runs: its programs start, do
what does not depend on the predecessor (the skinny GEMM asks L2 for its first weight tiles), then block in
`gdc_wait` until the predecessor has finished and its writes are visible. Each kernel calls
`gdc_launch_dependents` first thing, so the next kernel is let in as soon as all of this one's programs
are resident (its programs then queue behind ours for SMs; the skinny GEMM's weight prefetch runs on
the SMs our tail leaves idle). H100, Llama-3.1-8B shape, batch 1 (BENCHMARKS.md): 166.0 tok/s
without PDL; 171.8 with it (trigger after the wait, no prefetch), 173.6 with a 4-tile weight
prefetch, 174.9 triggering first; prefetching 2 / 4 / 6 / 8 tiles: 177.3 / 175.3 / 173.9 / 167.0.

Every kernel launched with PDL must wait in every program before it reads inputs or writes outputs:
that wait is also what makes "kernel n finished" imply "kernel n - 1 finished" down the chain, so a
launch never runs ahead of data it needs, however far the early launches cascade.
Stream capture keeps the PDL edges, so CUDA graphs replay the overlap. AUTODEPLOY_PDL=0 turns it off
(for A/B timings); on CPU (the interpreter) and before sm_90 it is always off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    """Let the next kernel launch, then block until the previous kernel's writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_l2(ptrs):
    """Start bringing the 128-byte lines at `ptrs` (valid addresses) into L2: no registers, no wait."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_first_lines(row_starts, LINES: tl.constexpr, LINE: tl.constexpr, row_len):
    """prefetch_l2 of the first LINES lines (LINE elements each, clipped to row_len) of each row, one address per
    line: what a GEMV's first K step reads. row_starts: pointers [1, R, 1, 1] (the GEMVs' tile axes)."""
    prefetch_l2(row_starts + tl.minimum(tl.arange(0, LINES)[:, None, None, None] * LINE, row_len - 1))


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL."""
    if device.type != "cuda" or os.environ.get("AUTODEPLOY_PDL", "1") == "0":
        return False
    return _device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch(device: torch.device, enabled: bool = True) -> dict:
    """Launch keywords for a kernel that takes `USE_PDL: tl.constexpr` and calls `wait_for_inputs`; `enabled`
    False launches it plainly (a kernel measured slower with PDL)."""
    on = enabled and pdl_enabled(device)
    return {"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False}
