"""The small per-layer kernels of a decode step at the Llama-3.1-8B shapes, us per call at 1 and 64 rows:
the residual add + RMSNorm (bf16 out, or e4m3 with per-token / per-128-group scales), the standalone
activation quantization, and act(gate) * up (bf16 out, or quantized). Each is timed as a CUDA graph of
many calls on separate buffers, so launch gaps count as they do in a captured decode step (PDL off:
AUTODEPLOY_PDL=0 to compare with `autodeploy bench --profile`). Every kernel is checked against its
reference first.
Usage: python3 benchmarks/act_kernels_bench.py"""

import torch
import triton

import autodeploy.kernels  # noqa: F401  (registers the ops)
from autodeploy.kernels import triton_fp8_act_quant, triton_gated_act, triton_rms_norm

HIDDEN, INTERMEDIATE = 4096, 14336
CALLS = 32  # one per layer
ops = torch.ops.autodeploy


def cases(rows: int) -> dict:
    """name -> (our call, the reference call) on fresh bf16 inputs."""
    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    x, residual, w = t(rows, HIDDEN), t(rows, HIDDEN), t(HIDDEN).abs() + 0.5
    gate_up = t(rows, 2 * INTERMEDIATE)
    gate, up = gate_up[:, :INTERMEDIATE], gate_up[:, INTERMEDIATE:]
    found = {"add_rms_norm bf16": (lambda: triton_rms_norm.fused_add_rms_norm(x, residual, w, 1e-5),
                                   lambda: ops.fused_add_rms_norm(x, residual, w, 1e-5)),
             "gated_act bf16": (lambda: triton_gated_act.gated_act(gate, up, "silu"),
                                lambda: ops.gated_act(gate, up, "silu"))}
    for group in (-1, 128):
        label = "token" if group == -1 else f"group{group}"
        found[f"add_rms_norm fp8 {label}"] = (
            lambda g=group: triton_rms_norm.fused_add_rms_norm_quant_fp8(x, residual, w, 1e-5, g),
            lambda g=group: ops.fused_add_rms_norm_quant_fp8(x, residual, w, 1e-5, g))
        found[f"quantize {HIDDEN} {label}"] = (lambda g=group: triton_fp8_act_quant.quantize_fp8_per_token(x, g),
                                               lambda g=group: ops.quantize_fp8_per_token(x, g))
        found[f"gated_act fp8 {label}"] = (lambda g=group: triton_gated_act.gated_act_quant_fp8(gate, up, "silu", g),
                                           lambda g=group: ops.gated_act_quant_fp8(gate, up, "silu", g))
    return found


def agree(got, ref) -> bool:
    got, ref = (got,) if isinstance(got, torch.Tensor) else got, (ref,) if isinstance(ref, torch.Tensor) else ref
    return all((a.float() - b.float()).abs().max().item() <= 0.07 * b.float().abs().max().item() + 1e-6
               for a, b in zip(got, ref))


def main() -> None:
    torch.manual_seed(0)
    for rows in (1, 64):
        pool = [cases(rows) for _ in range(CALLS)]
        for name in pool[0]:
            ours, ref = pool[0][name]
            ok = "" if agree(ours(), ref()) else "  WRONG against the reference"
            us = triton.testing.do_bench_cudagraph(lambda: [p[name][0]() for p in pool], rep=50) * 1e3 / CALLS
            print(f"rows {rows:2d}  {name:28s} {us:6.2f} us{ok}", flush=True)


if __name__ == "__main__":
    main()
