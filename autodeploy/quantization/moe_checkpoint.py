"""Pre-quantized MoE experts: a hub checkpoint's per-expert tensors stacked into fp8_moe / int_moe params.

Hub checkpoints (what llm-compressor and ModelOpt write) store every expert projection as a linear of
its own, `<block>.experts.{e}.gate_proj|up_proj|down_proj` (Mixtral: `w1|w3|w2` under
`block_sparse_moe`), while the exported graph holds transformers 5's stacked experts, gate_up
[E, 2I, H] and down [E, H, I]. Each expert projection is read by the format's own linear reader (the
layouts of dense linears, checkpoint.py), gate and up rows are concatenated and the experts stacked:
the codes are never dequantized. FP8 per-tensor weight scales become per-channel rows (gate's and up's
differ, and the fused GEMM has one scale per row); the static input scale of the fused gate/up GEMM is
the larger of the two (they read the same input, so a calibration gives both the same value).

Tensor parallelism (the sharding stage ran before): expert parallel reads only this rank's experts;
TP inside experts records each expert projection's slice as a dense linear's (gate / up rows, down
columns) in the graph's shard table, and parallel/quantized_slices.py scales it to codes and scales.
A checkpoint block named differently from the graph's (Mixtral's `block_sparse_moe` for `mlp`) is
matched by layer and its other tensors (the router) are read under the checkpoint's names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch.fx import GraphModule

from autodeploy.errors import QuantizationError
from autodeploy.parallel.quantized_slices import check_whole_blocks
from autodeploy.parallel.slices import ShardSlice

from .checkpoint import CheckpointFormat
from .loading import LayerLoad
from .rewrite import EXPERT_SUFFIX
from .schemes import LinearScheme

# The two naming conventions of per-expert projections in hub checkpoints: role -> names.
ROLES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
_PROJ = {name: role for role, names in ROLES.items() for name in names}
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.[^.]+$")
_RENAMES_KEY = "autodeploy_checkpoint_block_names"


@dataclass(frozen=True)
class ExpertBlock:
    """One MoE layer's experts in the checkpoint."""

    path: str  # checkpoint module path, e.g. model.layers.0.block_sparse_moe.experts
    experts: int
    names: dict[str, str]  # role (gate, up, down) -> projection name

    def linear(self, expert: int, role: str) -> str:
        return f"{self.path}.{expert}.{self.names[role]}"


def expert_blocks(keys: frozenset[str]) -> dict[str, ExpertBlock]:
    """Checkpoint path -> ExpertBlock, for every per-expert layout among `keys`."""
    found: dict[str, dict[int, set[str]]] = {}
    for key in keys:
        match = _EXPERT_KEY.match(key)
        if match and match.group(3) in _PROJ:
            found.setdefault(match.group(1), {}).setdefault(int(match.group(2)), set()).add(match.group(3))
    blocks = {}
    for path, experts in found.items():
        names = {_PROJ[name]: name for name in set().union(*experts.values())}
        if len(names) == 3 and sorted(experts) == list(range(len(experts))):
            blocks[path] = ExpertBlock(path, len(experts), names)
    return blocks


def block_for(graph_path: str, blocks: dict[str, ExpertBlock]) -> ExpertBlock | None:
    """The checkpoint's experts of the graph's `graph_path`: the same path, or one that differs in a
    single non-numeric component (a renamed block, same layer)."""
    if graph_path in blocks:
        return blocks[graph_path]
    near = [block for path, block in blocks.items() if _renamed_once(path.split("."), graph_path.split("."))]
    return near[0] if len(near) == 1 else None


def _renamed_once(a: list[str], b: list[str]) -> bool:
    differ = [(x, y) for x, y in zip(a, b) if x != y]
    return len(a) == len(b) and len(differ) == 1 and not any(part.isdigit() for part in differ[0])


def block_scheme(fmt: CheckpointFormat, block: ExpertBlock) -> LinearScheme | None:
    """The one scheme all of the block's expert projections are stored in (None: stored unquantized).

    fp8_moe / int_moe take one layout for every expert; int_moe has no act-order indices, and fp8_moe
    quantizes activations per token, per token and group with block weights, or with static scales (not per
    tensor, dynamically)."""
    schemes = {fmt.scheme_for(block.linear(e, role)) for e in range(block.experts) for role in ROLES}
    if len(schemes) != 1:
        shown = ", ".join(sorted(fmt.describe(s) if s else "unquantized" for s in schemes))
        raise QuantizationError(f"{block.path}: the experts are stored in several schemes ({shown}); "
                                "quantized MoE layers need one scheme for all experts")
    (scheme,) = schemes
    if scheme is not None and scheme.act_order:
        raise QuantizationError(f"{block.path}: act-order (g_idx) experts ({fmt.describe(scheme)}) are not supported: "
                                "int_moe has no act-order; use a checkpoint quantized without actorder / desc_act")
    if (scheme is not None and scheme.kind == "fp8" and not scheme.static_input and not scheme.weight_block
            and scheme.act_quant != "token"):
        raise QuantizationError(f"{block.path}: FP8 experts with dynamic per-{scheme.act_quant} activation scales are "
                                "not supported: fp8_moe quantizes activations per token or with static scales")
    return scheme


def stacked_scheme(scheme: LinearScheme) -> LinearScheme:
    """The layout of the stacked params: FP8 weight scales per channel (gate's and up's rows differ) unless
    they are per block."""
    return replace(scheme, per_channel=True) if scheme.kind == "fp8" and not scheme.weight_block else scheme


def _part_slices(spec: ShardSlice | None, parts: int, rows: int) -> tuple[list[int], list[ShardSlice | None]]:
    """A stacked weight's shard -> (experts this rank reads, each part's slice as a dense linear's).

    `rows`: the stacked weight's out features in the checkpoint ([E, parts * n, k]); the shard is along
    experts (dim 0, expert parallel), rows (dim 1: ranges inside each part) or columns (dim 2)."""
    if spec is None:
        return [], [None] * parts
    if spec.dim == 0:
        return [e for start, stop in spec.ranges for e in range(start, stop)], [None] * parts
    if spec.dim == 2:
        return [], [ShardSlice(1, spec.ranges, size=spec.size)] * parts
    size = rows // parts
    slices = []
    for p in range(parts):
        inside = tuple((a - p * size, b - p * size) for a, b in spec.ranges if p * size <= a and b <= (p + 1) * size)
        if sum(b - a for a, b in inside) * parts != spec.length:
            raise QuantizationError(f"the expert shard {list(spec.ranges)} does not split gate and up rows evenly")
        slices.append(ShardSlice(0, inside, size=size))
    return [], slices


def _sliced(n: int, k: int, spec: ShardSlice | None) -> tuple[int, int]:
    if spec is None:
        return n, k
    return (spec.length, k) if spec.dim == 0 else (n, spec.length)


class _Stacker:
    """Builds one MoE layer's stacked params from its experts' per-linear builds."""

    def __init__(self, scheme: LinearScheme, experts: list[int], loads: dict[tuple[int, str], LayerLoad],
                 fused: dict[str, tuple[str, ...]]):
        self.scheme, self.experts, self.loads, self.fused = scheme, experts, loads, fused

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for weight, roles in self.fused.items():
            per_expert = []
            for e in self.experts:
                built = [self._per_channel(self.loads[e, role].build(tensors)) for role in roles]
                per_expert.append(self._concat(built))
            for name in per_expert[0]:
                out[weight + EXPERT_SUFFIX[name]] = torch.stack([p[name] for p in per_expert])
        return out

    def _per_channel(self, built: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.scheme.kind == "fp8" and not self.scheme.weight_block:
            rows = built["weight"].shape[0]
            built["weight_scale"] = built["weight_scale"].float().reshape(-1).expand(rows).contiguous()
        return built

    @staticmethod
    def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Gate then up rows (one GEMM); a static input scale: the larger of the parts'."""
        return {name: torch.stack([p[name] for p in parts]).amax(0) if name == "input_scale"
                else torch.cat([p[name] for p in parts]) for name in parts[0]}


def experts_load(fmt: CheckpointFormat, block: ExpertBlock, scheme: LinearScheme, shapes: dict[str, tuple],
                 weight_shards: dict[str, ShardSlice], scale_dtype: torch.dtype, params: dict[str, str],
                 shard_table: dict[str, ShardSlice]) -> LayerLoad:
    """The LayerLoad of one MoE layer's stacked params from its experts' stored tensors.

    shapes: 'w_gate_up' / 'w_down' -> this rank's [E, N, K] (after sharding); weight_shards: the same
    keys -> this rank's slice of the stacked weight (absent when whole); params: graph parameter name ->
    'w_gate_up' / 'w_down' + stacked suffix. TP inside experts records each expert projection's slice
    in `shard_table` (the graph's, which load_weights reads by checkpoint name)."""
    fused = {"w_gate_up": ("gate", "up"), "w_down": ("down",)}
    experts, loads = None, {}
    for weight, roles in fused.items():
        spec = weight_shards.get(weight)
        full_rows = spec.size if spec is not None and spec.dim == 1 else shapes[weight][1]
        owned, slices = _part_slices(spec, len(roles), full_rows)
        experts = owned or experts or list(range(block.experts))
        for role, part in zip(roles, slices):
            n, k = _sliced(full_rows // len(roles), shapes[weight][2], part)
            _check_blocks(scheme, part, n, len(roles) > 1, block.linear(experts[0], role))
            for e in experts:
                path = block.linear(e, role)
                if part is not None:
                    shard_table[f"{path}.weight"] = part
                loads[e, role] = fmt.layer_load(path, scheme, n, k, scale_dtype, {})
    sources = {key: shape for load in loads.values() for key, shape in load.sources.items()}
    return LayerLoad(sources, _Stacker(scheme, experts, loads, fused), params)


def _check_blocks(scheme: LinearScheme, part: ShardSlice | None, rows: int, stacked: bool, path: str) -> None:
    """FP8 block experts: a rank's slice holds whole blocks, and gate's rows end on a block boundary (gate and up
    are stacked into one GEMM, whose scale rows are then gate's blocks followed by up's)."""
    check_whole_blocks(scheme, part, path)
    if scheme.weight_block and stacked and rows % scheme.weight_block:
        raise QuantizationError(f"{path}: {rows} rows do not fill whole FP8 weight blocks of {scheme.weight_block}, "
                                "so gate's and up's blocks cannot be stacked into one GEMM")


def record_block_name(gm: GraphModule, graph_path: str, block: ExpertBlock) -> None:
    """When the checkpoint names the experts' block differently, the block's other tensors are read
    under its name (`checkpoint_aliases`)."""
    graph_block, ckpt_block = graph_path.rpartition(".")[0], block.path.rpartition(".")[0]
    if graph_block != ckpt_block:
        gm.meta.setdefault(_RENAMES_KEY, {})[graph_block + "."] = ckpt_block + "."


def checkpoint_aliases(gm: GraphModule, names) -> dict[str, list[str]]:
    """Parameter name -> the checkpoint name it has under a renamed MoE block (see record_block_name)."""
    renames = gm.meta.get(_RENAMES_KEY, {})
    return {name: [ckpt + name.removeprefix(graph)] for name in names for graph, ckpt in renames.items()
            if name.startswith(graph)}
