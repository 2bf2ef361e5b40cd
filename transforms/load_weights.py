"""Stream the checkpoint's tensors into the graph's parameters on the target device.

Runs after the graph rewrites so later sharding/quantization stages can decide what each device
loads. Also moves the graph itself off the meta device: ops that create tensors (arange, to, ...)
were traced with `device=meta` and now name the target device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from autodeploy.errors import WeightLoadingError
from autodeploy.export import WRAPPER_PREFIX
from autodeploy.graph_utils import graph_modules

from .registry import Stage, Transform, TransformConfig, TransformContext, register

_META = torch.device("meta")


@dataclass
class LoadWeightsConfig(TransformConfig):
    seed: int = 0  # random init seed when the model has no checkpoint (config-only)


def _tied_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Names that share one parameter object in the HF model (tied embeddings), both directions."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: [m for m in names if m != n] for names in by_id.values() for n in names}


def _open_checkpoint(files) -> dict[str, object]:
    """Checkpoint key -> open safetensors handle (tensors are read one at a time, on demand)."""
    from safetensors import safe_open

    where = {}
    for f in files:
        handle = safe_open(str(f), framework="pt")
        for key in handle.keys():
            where[key] = handle
    return where


def _retarget_devices(gm: GraphModule, device: torch.device) -> None:
    def swap(value):
        if isinstance(value, torch.device) and value == _META:
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        return value

    for module in graph_modules(gm):
        for node in module.graph.nodes:
            node.args = swap(node.args)
            node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}


def _random_like(param: torch.Tensor, name: str, dtype: torch.dtype, device: torch.device, gen) -> torch.Tensor:
    """Config-only mode: HF-like init (normal 0.02 for matrices, ones for norm weights)."""
    shape = tuple(param.shape)
    if param.dim() == 1 and "norm" in name and not name.endswith("bias"):
        return torch.ones(shape, dtype=dtype, device=device)
    if param.dim() == 1:
        return torch.zeros(shape, dtype=dtype, device=device)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(device=device, dtype=dtype)


@register
class LoadWeights(Transform):
    name = "load_weights"
    stage = Stage.WEIGHT_LOADING
    config_cls = LoadWeightsConfig

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        checkpoint = _open_checkpoint(ctx.source.weight_files) if ctx.source.weight_files else None
        aliases = _tied_aliases(ctx.meta_model)
        gen = torch.Generator().manual_seed(self.config.seed)
        loaded = random = moved = 0
        missing = []
        done: dict[int, torch.Tensor] = {}  # one value per tensor object: tied weights stay tied
        tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
        for name, param in tensors:
            owner, attr = _owner(gm, name)
            is_param = isinstance(param, torch.nn.Parameter)
            if id(param) in done:
                value = done[id(param)]
            elif param.device != _META:
                value, moved = param.to(ctx.device), moved + 1  # real buffers, e.g. RoPE inv_freq
            elif checkpoint is None:
                value, random = _random_like(param, name, ctx.dtype, ctx.device, gen), random + 1
            else:
                key = _checkpoint_key(name.removeprefix(WRAPPER_PREFIX), checkpoint, aliases)
                if key is None:
                    missing.append(name.removeprefix(WRAPPER_PREFIX))
                    continue
                value = checkpoint[key].get_tensor(key)
                if tuple(value.shape) != tuple(param.shape):
                    raise WeightLoadingError(f"{key}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}")
                dtype = ctx.dtype if value.is_floating_point() else value.dtype
                value, loaded = value.to(device=ctx.device, dtype=dtype), loaded + 1
            if is_param and not isinstance(value, torch.nn.Parameter):
                value = torch.nn.Parameter(value, requires_grad=False)
            done[id(param)] = value
            setattr(owner, attr, value)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise WeightLoadingError(f"the checkpoint lacks {len(missing)} weights the model needs: {shown}")
        _retarget_devices(gm, ctx.device)
        ctx.weights_loaded = True
        return {"loaded": loaded, "random_init": random, "moved": moved}


def _owner(gm: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr


def _checkpoint_key(name: str, checkpoint: dict, aliases: dict[str, list[str]]) -> str | None:
    for candidate in [name, *aliases.get(name, [])]:
        if candidate in checkpoint:
            return candidate
    return None
