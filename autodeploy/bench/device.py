"""The device side of a benchmark: synchronized clocks, copy bandwidth, weight bytes, versions.

Batch-1 decode reads every weight once per token, so its ceiling is the bytes a token reads over
memory bandwidth: the weights as stored (quantized codes and their scales for a quantized model),
except an embedding table that is only gathered, of which a token reads one row, and the copies of an
`int4_linear_tinygemm` that one row does not read (it reads the GEMV's codes and coefficients when the op has
them and runs the GEMV at one row, else the tinygemm copy), and the scales and column order that an
`int_linear_gemv` reads past its GEMV's rows only. The bandwidth is measured, not taken from a datasheet: a
large device-to-device copy, counting the bytes read plus the bytes written, median of several timed repeats.
"""

from __future__ import annotations

import platform
import time

import torch
from torch.fx import GraphModule, Node

from autodeploy.graph_utils import attr_tensor, distinct_tensors
from autodeploy.patterns.helpers import bind_args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """perf_counter after all queued device work has finished."""
    synchronize(device)
    return time.perf_counter()


def elapsed(fn, device: torch.device) -> float:
    """Seconds `fn` takes on the device: CUDA events (no host launch or sync overhead), else a clock."""
    if device.type != "cuda":
        start = now(device)
        fn()
        return now(device) - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 20) -> float:
    """Bytes per second of `dst.copy_(src)` for an `nbytes` buffer, read + write counted."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()  # never zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = sorted(elapsed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]


_MOE_OPS = ("moe", "fp8_moe", "int_moe")  # and their backends (<op>_triton)


def _routed_experts(node: Node, user: Node) -> tuple[str, int] | None:
    """("experts", k) when `user` is a MoE op reading `node` as stacked expert params: a token reads k of them."""
    ops = torch.ops.autodeploy
    moe_ops = {getattr(ops, name).default for base in _MOE_OPS for name in (base, f"{base}_triton") if hasattr(ops, name)}
    if user.target not in moe_ops:
        return None
    args = bind_args(user)
    if node in (args["x"], args["topk_ids"], args["topk_weights"]):
        return None
    return "experts", args["topk_ids"].meta["val"].shape[-1]


def _use(node: Node, user: Node) -> str | tuple[str, int]:
    """How a batch-1 step reads the tensor of get_attr `node` in `user`: gather (one row), many_rows (not at
    all: the copies of an int4_linear_tinygemm, the tensors of an int_linear_gemv, that one row does not read),
    ("experts", k) (the k routed experts' slices of a stacked expert tensor) or other (whole)."""
    if user.target is torch.ops.aten.embedding.default and user.args[0] is node:
        return "gather"
    routed = _routed_experts(node, user)
    if routed is not None:
        return routed
    if user.target is torch.ops.autodeploy.int4_linear_tinygemm.default:
        args = bind_args(user)
        weight = [args[k] for k in ("qweight", "scales", "zeros", "packed", "scales_and_zeros", "gemv_words",
                                    "gemv_coeffs", "columns")]
        if args["gemv_words"] is not None and args["gemv_rows"] >= 1:
            read = (args["gemv_words"], args["gemv_coeffs"])
        else:
            read = (args["packed"], args["scales_and_zeros"]) if args["max_rows"] >= 1 else weight
        if node in weight and node not in read:
            return "many_rows"
    if user.target is torch.ops.autodeploy.int_linear_gemv.default:
        args = bind_args(user)
        if node in (args["scales"], args["zeros"], args["columns"]):  # one row reads the coefficients instead
            return "many_rows"
    return "other"


def bytes_read_per_token(gm: GraphModule) -> int:
    """Bytes one batch-1 decode step reads from weights: all of them (as stored), but one row of a
    table whose every use is an `aten.embedding` gather (a table tied to the LM head is read whole),
    k / E of stacked MoE experts (one token's routed experts), and none of the tensors only the many-row
    paths of int4_linear_tinygemm and int_linear_gemv read."""
    uses: dict[int, set] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = attr_tensor(gm, node)
            uses.setdefault(id(t), set()).update(_use(node, u) for u in node.users)
    total = 0
    for key, t in distinct_tensors(gm).items():
        nbytes = t.numel() * t.element_size()
        used = uses.get(key, set())
        if used == {"gather"}:
            total += nbytes // t.shape[0]
        elif len(used) == 1 and isinstance(next(iter(used)), tuple):  # stacked experts, k of E routed
            experts = t.shape[0]
            total += nbytes * min(next(iter(used))[1], experts) // experts
        elif used != {"many_rows"}:
            total += nbytes
    return total


def bytes_by_dtype(module: torch.nn.Module) -> dict[str, int]:
    """Weight bytes per storage dtype (how much of a model a quantization scheme covers)."""
    out: dict[str, int] = {}
    for t in distinct_tensors(module).values():
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def describe(device: torch.device) -> dict:
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version()}
    import transformers

    info["transformers"] = transformers.__version__
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
