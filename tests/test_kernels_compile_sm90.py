"""Every Triton kernel compiles for sm_90 (Hopper), on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts code the compiler refuses: an early
`return` under a constexpr `if` in a @triton.jit helper passed every interpreter test and failed to compile
on an H200, costing a device call. Here each kernel wrapper runs once on small CPU tensors in the
interpreter while every launch's argument types and constexprs are recorded; a subprocess without the
interpreter then compiles each launch for sm_90 (Triton's front end, its passes and PTX; ptxas ships with
Triton), also with PDL on where the kernel takes it, with the installed Triton and with the GPU image's
(GPU_TRITON, which scripts/setup.sh installs beside it). No GPU, so nothing here runs compiled code.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import triton

import autodeploy.kernels  # noqa: F401
from autodeploy.kernels.quant_format import quantize_fp8, quantize_fp8_blocks, quantize_int

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records the interpreter's launches (CPU runs)")

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
         torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}
COMPILE = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compiled(launch, constexprs):
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    names = kernel.arg_names
    source = ASTSource(fn=kernel, signature=launch["signature"],
                       constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(k),): [["tt.divisibility", 16]] for k in launch["divisible"]})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])


def loop_barriers(ptx):
    # bar.sync lines between a label and a later branch back to it
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\$L__\w+):", line))}
    return sum("bar.sync" in lines[j] or "barrier.sync" in lines[j]
               for i, line in enumerate(lines) for target in re.findall(r"bra(?:\.uni)?\s+(\$L__\w+);", line)
               if labels.get(target, i) < i for j in range(labels[target], i))


def mma_layouts(ttgir):
    # the blocked layout of each inline-asm mma.sync's result
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<.*>)$", ttgir, re.M))
    return [layouts.get(m, m) for m in re.findall(r'elementwise_inline_asm "mma\.sync.*-> .*?tensor<[^,]*, (#\w+)>', ttgir)]


def local_memory(cubin):
    # SASS loads / stores of local memory: registers ptxas spilled
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\b(?:STL|LDL)\b", sass))


failures = []
for launch in json.load(sys.stdin):
    if sys.argv[1:] == ["loop-barriers"]:
        failures.append(loop_barriers(compiled(launch, launch["constexprs"]).asm["ptx"]))
        continue
    if sys.argv[1:] == ["mma-layouts"]:
        failures.append(mma_layouts(compiled(launch, launch["constexprs"]).asm["ttgir"]))
        continue
    if sys.argv[1:] == ["local-memory"]:
        failures.append(local_memory(compiled(launch, launch["constexprs"]).asm["cubin"]))
        continue
    for pdl in ([False, True] if "USE_PDL" in launch["constexprs"] else [False]):
        try:
            compiled(launch, dict(launch["constexprs"], **({"USE_PDL": pdl} if pdl else {})))
        except Exception as e:
            failures.append(f"{launch['name']} (PDL {pdl}): {type(e).__name__}: {str(e)[:600]}")
print(triton.__version__)
print(json.dumps(failures))
"""

# The GPU image's Triton (its front end refuses code that newer ones accept), installed here by scripts/setup.sh
GPU_TRITON = "3.6.0"


def _gpu_triton_dir() -> str | None:
    """Where the GPU image's Triton is installed for this compile: AUTODEPLOY_SM90_TRITON=<dir> (`pip install
    --no-deps --target <dir> triton==...`), else the one scripts/setup.sh put in the venv; None if neither."""
    path = os.environ.get("AUTODEPLOY_SM90_TRITON") or os.path.join(sys.prefix, f"triton-{GPU_TRITON}")
    return path if os.path.isdir(os.path.join(path, "triton")) else None


def _describe(fn, args: tuple, kwargs: dict) -> dict:
    """A launch as the compiler wants it: a type per runtime argument, the constexprs' values, the options."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    kwargs.pop("launch_pdl", None)
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, divisible = {}, {}, []
    for name, parameter in inspect.signature(fn).parameters.items():
        value = bound.arguments[name]
        if "constexpr" in str(parameter.annotation) or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            divisible += [name] if value.data_ptr() % 16 == 0 else []
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            divisible += [name] if value % 16 == 0 else []
        else:
            signature[name] = "fp32"
    if constexprs.get("INTERPRET"):
        constexprs["INTERPRET"] = False  # the GPU form of the e4m3 conversions
    # as the launcher specializes them (pointers and ints divisible by 16): vectorized forms compile differently
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "divisible": divisible, "options": options}


@contextmanager
def recorded_launches():
    from triton.runtime.interpreter import InterpretedFunction

    launches, run = [], InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launches.append(_describe(self.fn, args, dict(kwargs)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


def _run_every_wrapper() -> None:
    """Each kernel wrapper once per form worth compiling (dtypes, flags that change the code)."""
    from autodeploy.kernels import (triton_argmax, triton_cached_attention, triton_decode_attention,
                                    triton_fp8_act_quant, triton_fp8_gemv, triton_gated_act, triton_int_dot,
                                    triton_int4_mma_gemv, triton_int_gemv,
                                    triton_linear, triton_moe,
                                    triton_quant_fp8_linear, triton_quant_gemv, triton_quant_int_linear,
                                    triton_rms_norm, triton_rope)

    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    x, residual = (torch.randn(3, 256, generator=g).to(bf16) for _ in range(2))
    w = torch.ones(256, dtype=bf16)
    triton_rms_norm.rms_norm(x, w, 1e-6)
    qkv = torch.randn(1, 3, 4 * 128, generator=g).to(bf16)  # per-head norms read in place from a fused qkv
    triton_rms_norm.rms_norm(qkv[..., :256].view(1, 3, 2, 128), torch.ones(128, dtype=bf16), 1e-6)
    triton_rms_norm.fused_add_rms_norm(x, residual, w, 1e-6)
    for group in (-1, 128):
        triton_rms_norm.fused_add_rms_norm_quant_fp8(x, residual, w, 1e-6, group)
        triton_fp8_act_quant.quantize_rows_fp8(x, group)
        triton_gated_act.gated_act_quant_fp8(x, residual, "silu", group)
    static = torch.tensor(0.5)  # a static input scale
    triton_rms_norm.fused_add_rms_norm_quant_fp8(x, residual, w, 1e-6, -1, static)
    triton_gated_act.gated_act_quant_fp8(x, residual, "silu", -1, static)
    for activation in ("silu", "swigluoai"):  # Llama's, GPT-OSS's clamped SwiGLU
        triton_gated_act.gated_act(x, residual, activation)
    q = torch.randn(1, 4, 3, 64, generator=g).to(bf16)
    k, cos = torch.randn(1, 2, 3, 64, generator=g).to(bf16), torch.randn(1, 1, 3, 64, generator=g).to(bf16)
    for rotation in (cos, cos.float()):  # products rounded to bf16, or not (OLMo 2: float32 cos / sin)
        triton_rope.rope(q, rotation, rotation)
        triton_rope.rope_pair(q, k, rotation, rotation, True)
    weight = torch.randn(48, 256, generator=g)
    triton_linear.skinny_linear(x, weight.to(bf16))
    gate, up = torch.randn(1, 512, generator=g).to(bf16).chunk(2, dim=-1)  # strided halves of one gate_up output
    for activation in ("silu", "gelu_tanh"):  # the GATED prologue (gated_linear) with Llama's and Gemma's activations
        triton_linear.skinny_linear(gate, weight.to(bf16), up=up, activation=activation)
    for norm_weight in (w, w.float()):  # the NORM prologue (add_rms_norm_linear), normed rounded (Llama) or not
        norm = triton_linear.NormPrologue(residual[:1], norm_weight, 1e-6, torch.empty_like(x[:1]))
        triton_linear.skinny_linear(x[:1], weight.to(bf16), norm=norm, **triton_linear.WIDE_KNOBS)
    qweight, scales, zeros = quantize_int(weight.to(bf16), 4, 128, False)
    triton_quant_gemv.gemv_int_linear(x[:1], qweight, scales, zeros, None, 4, 128)
    big = torch.randn(16, 4096, generator=g)  # whole K steps at every bit width's default knobs
    for bits, group in ((4, 128), (8, -1)):
        codes, s, z = quantize_int(weight.to(bf16), bits, group, bits == 8)
        words, coeffs = triton_int_gemv.interleave_codes(codes, bits), triton_int_gemv.gemv_coefficients(s, z, bits)
        for rows in (1, 3):  # K 256: one uneven K step
            triton_int_gemv.int_gemv(x[:rows], words, coeffs, w, group, bits)
        q_big, s_big, _ = quantize_int(big, bits, group, True)
        triton_int_gemv.int_gemv(big[:1].to(bf16), triton_int_gemv.interleave_codes(q_big, bits),
                                 triton_int_gemv.gemv_coefficients(s_big, None, bits), None, group, bits)
        if bits == 4:  # the tensor-core GEMV: one row and five, one group a step and two
            triton_int4_mma_gemv.int4_mma_gemv(big[:1].to(bf16), triton_int_gemv.interleave_codes(q_big, bits),
                                               triton_int_gemv.gemv_coefficients(s_big, None, bits), None, group)
            triton_int4_mma_gemv.int4_mma_gemv(x[:5].to(bf16), words, coeffs, w, group, 2, 1, 2)
        for swap, splat, split in ((True, True, 1), (True, False, 2), (False, False, 1)):  # operand orders, loads
            triton_int_dot.int_dot(x, words, s, z, None, bits, group, True, swap=swap, splat=splat, split_k=split)
        triton_int_dot.int_dot(x, codes, s, z, w.float()[:48], bits, group)  # canonical words, a bias
    triton_quant_int_linear.skinny_int_linear(x, qweight, scales, zeros, None, None, 4, 128)
    triton_quant_int_linear.dequantize_int_triton(qweight, scales, zeros, None, 4, 128, 256, bf16)
    f8, f8_scale = quantize_fp8(weight, True)
    triton_fp8_act_quant.quantize_rows_fp8(x, -1, static)
    triton_fp8_act_quant.quantize_tensor_fp8(x)  # the rows' scales alone, then x by their largest
    triton_quant_fp8_linear.skinny_fp8_linear(x, f8, f8_scale, None, None, "token")
    for group, split, rows, block_m in ((-1, 1, 3, None), (128, 2, 3, None), (128, 1, 70, 64)):
        qx, sx = triton_fp8_act_quant.quantize_rows_fp8(torch.randn(rows, 256, generator=g).to(bf16), group)
        triton_quant_fp8_linear.skinny_fp8_linear(qx, f8, f8_scale, None, None, block_n=64, block_k=128,
                                                  swap=block_m is None, x_scale=sx, out_dtype=bf16, x_group=group,
                                                  block_m=block_m, split_k=split)
        if rows <= triton_fp8_gemv.MAX_ROWS:  # K 256: one uneven K step; a bias
            triton_fp8_gemv.fp8_gemv(qx, sx, f8, f8_scale, w, bf16, group)
    blocked, block_scales = quantize_fp8_blocks(weight, 128)  # the weight's 128 x 128 blocks, per K step
    for rows, block_m in ((3, None), (70, 64)):
        qx, sx = triton_fp8_act_quant.quantize_rows_fp8(torch.randn(rows, 256, generator=g).to(bf16), 128)
        triton_quant_fp8_linear.skinny_fp8_linear(qx, blocked, block_scales, None, None, block_n=64, block_k=128,
                                                  swap=block_m is None, x_scale=sx, out_dtype=bf16, x_group=128,
                                                  block_m=block_m)
        if rows <= triton_fp8_gemv.MAX_ROWS:  # the GEMV with the blocks per group
            triton_fp8_gemv.fp8_gemv(qx, sx, blocked, block_scales, None, bf16, 128)
    for group, knobs in ((-1, triton_fp8_gemv.knobs_for(1)), (128, triton_fp8_gemv.knobs_for(10**6))):  # whole K
        qx, sx = triton_fp8_act_quant.quantize_rows_fp8(big[:1].to(bf16), group)  # steps at each default knob set
        triton_fp8_gemv.fp8_gemv(qx, sx, *quantize_fp8(big, True), None, bf16, group, *knobs)
    qx, sx = triton_fp8_act_quant.quantize_rows_fp8(big[:1].to(bf16), 128)  # block weights at the 8B knob sets
    for knobs in (triton_fp8_gemv.knobs_for(1), triton_fp8_gemv.knobs_for(10**6)):
        triton_fp8_gemv.fp8_gemv(qx, sx, *quantize_fp8_blocks(big, 128), None, bf16, 128, *knobs)
    for dtype in (bf16, torch.float8_e4m3fn):
        k_cache, v_cache = (torch.zeros(4, 16, 2, 64).to(dtype) for _ in range(2))
        slots = torch.tensor([0, 1, 17])
        triton_decode_attention.write_kv_cache(k, k, k_cache, v_cache, slots)
        seq_lens, tables = torch.tensor([2, 1], dtype=torch.int32), torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
        triton_decode_attention.decode_attention(q[:, :, :2], k_cache, v_cache, seq_lens, tables, 0.125)
        for splits, merge in ((1, None), (None, True), (None, False)):  # the fused KV write: single pass, splits
            # merged in the kernel or by the reduce kernel
            triton_decode_attention.decode_attention(q[:, :, :2], k_cache, v_cache, seq_lens, tables, 0.125,
                                                     num_splits=splits, k=k[:, :, :2], v=k[:, :, :2],
                                                     slot_mapping=slots[:2], merge_in_kernel=merge)
        cos = torch.randn(1, 1, 2, 64, generator=g).to(bf16)
        for interleaved, rotation in ((False, cos), (True, cos), (False, cos.float())):  # RoPE inside
            # (fuse_rope_attention), products rounded to bf16, then not (float32 cos / sin)
            rope = triton_decode_attention.rope_rows(q[:, :, :2], rotation, rotation, interleaved)
            triton_decode_attention.decode_attention(q[:, :, :2], k_cache, v_cache, seq_lens, tables, 0.125,
                                                     k=k[:, :, :2], v=k[:, :, :2], slot_mapping=slots[:2], rope=rope)
        cu = torch.tensor([0, 2, 3], dtype=torch.int32)
        triton_cached_attention.paged_attention(q, k_cache, v_cache, cu, seq_lens, tables, 0.125)
        sinks = torch.randn(4, generator=g).to(bf16)  # GPT-OSS's attention sinks: prefill, then decode (split or not)
        triton_cached_attention.paged_attention(q, k_cache, v_cache, cu, seq_lens, tables, 0.125, sinks=sinks)
        for splits in (1, None):
            triton_decode_attention.decode_attention(q[:, :, :2], k_cache, v_cache, seq_lens, tables, 0.125,
                                                     num_splits=splits, k=k[:, :, :2], v=k[:, :, :2],
                                                     slot_mapping=slots[:2], sinks=sinks)
    triton_argmax.argmax_rows(torch.randn(2, 300, generator=g))
    ids = torch.tensor([[0, 2], [2, 1], [0, 0]])  # routed experts: 16-pair tiles, then 64 with a bias
    experts = [torch.randn(3, 2 * n, k, generator=g).to(bf16) for n, k in ((128, 256), (128, 256))]
    for activation in ("silu", "swigluoai"):
        triton_moe.moe(x, ids, torch.rand(3, 2).to(bf16), experts[0], experts[1][:, :256, :128], activation)
    many = torch.randint(0, 3, (40, 2), generator=g)
    triton_moe.moe(torch.randn(40, 256, generator=g).to(bf16), many, torch.rand(40, 2).to(bf16), experts[0],
                   experts[1][:, :256, :128], "silu", torch.zeros(3, 256, dtype=bf16), None)
    for ids_, block in ((ids, 0), (many, 128)):  # e4m3 experts: per-channel scales, then 128 x 128 blocks
        quantized = [[quantize_fp8_blocks(e, 128) if block else quantize_fp8(e, True) for e in w.float()]
                     for w in (experts[0], experts[1][:, :256, :128])]
        (q_gu, s_gu), (q_d, s_d) = ((torch.stack([p[0] for p in w]), torch.stack([p[1] for p in w])) for w in quantized)
        triton_moe.fp8_moe(torch.randn(ids_.shape[0], 256, generator=g).to(bf16), ids_, torch.rand(*ids_.shape).to(bf16),
                           q_gu, s_gu, q_d, s_d, "silu", weight_block=block)


@pytest.fixture(scope="module")
def unique_launches() -> list[dict]:
    with recorded_launches() as launches:
        _run_every_wrapper()
    return list({json.dumps(launch, sort_keys=True): launch for launch in launches}.values())


def _compiler_env(compiler: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if compiler == "gpu-image":
        path = _gpu_triton_dir()
        if path is None:
            pytest.skip(f"triton {GPU_TRITON} not installed for this check (scripts/setup.sh installs it)")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("compiler", ["installed", "gpu-image"])
def test_every_kernel_compiles_for_sm90(unique_launches, compiler):
    """Launches recorded with this interpreter compile with the installed Triton and with the GPU image's."""
    unique, env = unique_launches, _compiler_env(compiler)
    assert {launch["name"] for launch in unique} >= {
        "_rope_kernel", "_skinny_fp8_kernel", "_gemv_int_kernel", "_int_gemv_kernel", "_decode_attention_kernel",
        "_kv_write_kernel", "_decode_reduce_kernel", "_int_dot_kernel", "_fp8_gemv_kernel", "_grouped_gemm_kernel",
        "_expert_tiles_kernel", "_int4_mma_gemv_kernel"}
    for prologue in ("GATED", "NORM"):
        assert any(launch["name"] == "_skinny_linear_kernel" and launch["constexprs"][prologue] for launch in unique)
    done = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(unique),
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    *_, version, failures = done.stdout.strip().splitlines()
    assert compiler == "installed" or version == GPU_TRITON, version
    failures = json.loads(failures)
    assert not failures, "\n".join(failures)


def test_gemv_k_loops_have_no_barrier(unique_launches):
    """The INT and FP8 GEMVs' K loops keep every tile in one register layout: a layout conversion there costs a
    round trip through shared memory and its barriers every K step (INT4 batch-1 decode 10 % slower on an H200,
    session 14). Checked in the PTX of the GPU image's Triton for the recorded launches with whole K steps."""
    gemv = [launch for launch in unique_launches
            if launch["name"] in ("_int_gemv_kernel", "_fp8_gemv_kernel") and launch["constexprs"]["EVEN_K"]]
    assert {launch["constexprs"].get("BITS", 8) for launch in gemv} == {4, 8}
    assert sum(launch["name"] == "_fp8_gemv_kernel" for launch in gemv) == 4  # per channel and blocks, two knob sets
    done = subprocess.run([sys.executable, "-c", COMPILE, "loop-barriers"], input=json.dumps(gemv),
                          capture_output=True, text=True, env=_compiler_env("gpu-image"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    barriers = json.loads(done.stdout.strip().splitlines()[-1])
    assert barriers == [0] * len(gemv), barriers


def test_mma_gemv_hands_each_lane_its_fragment(unique_launches):
    """`_int4_mma_gemv_kernel` relies on thread i holding row i of its [warps * 32, unroll] tiles (one warp's MMA
    per asm instance); Triton picks the layouts, so the compiled one is checked: one element per thread along
    axis 0, 32 lanes then the warps there, the units in each thread's registers."""
    mma = [launch for launch in unique_launches if launch["name"] == "_int4_mma_gemv_kernel"]
    assert len(mma) >= 2
    done = subprocess.run([sys.executable, "-c", COMPILE, "mma-layouts"], input=json.dumps(mma),
                          capture_output=True, text=True, env=_compiler_env("gpu-image"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for launch, layouts in zip(mma, json.loads(done.stdout.strip().splitlines()[-1])):
        warps = launch["options"]["num_warps"]
        assert layouts, launch["constexprs"]
        for layout in layouts:
            assert "sizePerThread = [1, 1]" in layout and "threadsPerWarp = [32, 1]" in layout \
                and f"warpsPerCTA = [{warps}, 1]" in layout, layout


def test_gemvs_keep_their_registers(unique_launches):
    """The decode GEMVs at their default knobs spill no register to local memory (sm_90 SASS of the GPU image's
    Triton): an INT4 GEMV at 4 rows of x with 16 rows of W a program spilled ~4,000 times and ran 40-80x slower on an
    H200 (session 22)."""
    gemv = [launch for launch in unique_launches
            if launch["name"] in ("_int_gemv_kernel", "_fp8_gemv_kernel", "_int4_mma_gemv_kernel")]
    assert any(launch["name"] == "_int_gemv_kernel" and launch["constexprs"]["ROWS"] == 4 for launch in gemv)
    done = subprocess.run([sys.executable, "-c", COMPILE, "local-memory"], input=json.dumps(gemv),
                          capture_output=True, text=True, env=_compiler_env("gpu-image"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    spills = json.loads(done.stdout.strip().splitlines()[-1])
    assert spills == [0] * len(gemv), [(launch["name"], launch["constexprs"], n)
                                      for launch, n in zip(gemv, spills) if n]
