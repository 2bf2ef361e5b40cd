"""Stream the checkpoint's tensors into the graph's parameters on the target device.

Runs after the graph rewrites so later sharding/quantization stages can decide what each device
loads. Also moves the graph itself off the meta device: ops that create tensors (arange, to, ...)
were traced with `device=meta` and now name the target device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from autodeploy.errors import UnsupportedModelError, WeightLoadingError
from autodeploy.export import WRAPPER_PREFIX, dataless_constants
from autodeploy.graph_utils import graph_modules
from autodeploy.loading import initial_buffers
from autodeploy.quantization.checkpoint import checkpoint_format
from autodeploy.quantization.loading import quantized_loads
from autodeploy.quantization.moe_checkpoint import checkpoint_aliases
from autodeploy.parallel.quantized_slices import quantized_slices
from autodeploy.parallel.slices import checkpoint_name, shards_of

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
    return (torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.02)


@register
class LoadWeights(Transform):
    name = "load_weights"
    stage = Stage.WEIGHT_LOADING
    config_cls = LoadWeightsConfig

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        aliases = _tied_aliases(ctx.meta_model)
        for name, renamed in checkpoint_aliases(gm, [n.removeprefix(WRAPPER_PREFIX) for n, _ in gm.named_parameters()]).items():
            aliases.setdefault(name, []).extend(renamed)  # a MoE block the checkpoint names differently (Mixtral's router)
        computed = initial_buffers(ctx.meta_model)  # non-persistent buffers: values from init, not the checkpoint
        tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
        quantized = quantized_loads(gm)  # built from other checkpoint tensors (autodeploy/quantization)
        shards = shards_of(gm)  # this rank's slices (tensor parallelism)
        wanted = [checkpoint_name(n.removeprefix(WRAPPER_PREFIX), shards) for n, t in tensors
                  if t.is_meta and n.removeprefix(WRAPPER_PREFIX) not in computed and n not in quantized] + quantized.source_keys()
        source, counts = self._tensor_source(ctx, wanted, aliases, dict(shards), quantized.source_keys())
        gen = torch.Generator(device=ctx.device).manual_seed(self.config.seed)
        done: dict[int, torch.Tensor] = {}  # one value per tensor object: tied weights stay tied
        for name, old in tensors:
            if id(old) not in done and name in quantized:
                done[id(old)] = quantized.take(name, _quantized_reader(source, ctx, gen), ctx.device)
                counts["quantized"] = counts.get("quantized", 0) + 1
            elif id(old) not in done:
                done[id(old)] = self._materialize(name, old, source, computed, ctx, gen, counts)
            value = done[id(old)]
            if isinstance(old, torch.nn.Parameter) and not isinstance(value, torch.nn.Parameter):
                value = done[id(old)] = torch.nn.Parameter(value, requires_grad=False)
            owner, attr = _owner(gm, name)
            setattr(owner, attr, value)
        constants = dataless_constants(gm)
        if constants:
            raise UnsupportedModelError(
                f"the model creates a constant tensor in its forward ({constants[0]}); exported on the meta "
                "device it has no data: add an export patch for it"
            )
        _retarget_devices(gm, ctx.device)
        return counts

    def _tensor_source(self, ctx: TransformContext, wanted: list[str], aliases: dict[str, list[str]], shards: dict,
                       quantized_keys: list[str]):
        """Read safetensors by name; where names differ (old checkpoint layouts), let transformers convert.

        A sharded parameter (tensor parallelism) reads only this rank's slice."""
        if not ctx.source.weight_files:
            return None, {"random_init": 0, "moved": 0}
        checkpoint = _open_checkpoint(ctx.source.weight_files)
        if shards and quantized_keys:  # a pre-quantized checkpoint's scales and codes follow their weight's slice
            shards.update(quantized_slices(quantized_keys, shards, lambda key: _shape(checkpoint, key, aliases)))
        missing = [n for n in wanted if _checkpoint_key(checkpoint_name(n, shards), checkpoint, aliases) is None]
        if not missing:
            return (lambda name: _read(checkpoint, checkpoint_name(name, shards), aliases, shards.get(name))), \
                {"loaded": 0, "moved": 0}
        state = _converted_by_transformers(ctx)
        still_missing = [n for n in wanted if _checkpoint_key(n, state, aliases) is None]
        if still_missing:
            shown = ", ".join(still_missing[:5]) + (f" and {len(still_missing) - 5} more" if len(still_missing) > 5 else "")
            raise WeightLoadingError(f"the checkpoint lacks {len(still_missing)} weights the model needs: {shown}")

        def converted(name: str) -> torch.Tensor:
            full = state[_checkpoint_key(checkpoint_name(name, shards), state, aliases)]
            shard = shards.get(name)
            return full if shard is None else shard.take(full)

        return converted, {"converted": 0, "moved": 0}

    @staticmethod
    def _materialize(name, old, source, computed: dict, ctx: TransformContext, gen, counts: dict[str, int]):
        if name.removeprefix(WRAPPER_PREFIX) in computed:  # buffers computed at init, e.g. RoPE inv_freq
            counts["moved"] += 1
            return computed[name.removeprefix(WRAPPER_PREFIX)].to(ctx.device)
        if not old.is_meta:  # constants a pattern transform computed (ALiBi slopes): not in the checkpoint
            counts["moved"] += 1
            return old.to(ctx.device)
        # Every tensor takes the dtype the meta model gave it: the model dtype, or float32 where transformers keeps a
        # module in float32 (`_keep_in_fp32_modules(_strict)`: DeepSeek-V3's router weight, whose float32 casts the
        # graph no longer holds), and buffers' own dtypes (e.g. fp32 biases).
        dtype = old.dtype
        if source is None:
            counts["random_init"] += 1
            return _random_like(old, name, dtype, ctx.device, gen)
        value = source(name.removeprefix(WRAPPER_PREFIX))
        if tuple(value.shape) != tuple(old.shape):
            raise WeightLoadingError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(old.shape)}")
        key = "loaded" if "loaded" in counts else "converted"
        counts[key] += 1
        return value.to(device=ctx.device, dtype=dtype)


def _quantized_reader(source, ctx: TransformContext, gen):
    """read(key, shape) for quantized layers: the checkpoint's tensor, or a random one (config-only)."""
    if source is not None:
        return lambda key, shape: source(key)
    return lambda key, shape: _random_like(torch.empty(shape, device=_META), key, ctx.dtype, ctx.device, gen)


def _read(checkpoint: dict, name: str, aliases: dict[str, list[str]], shard) -> torch.Tensor:
    key = _checkpoint_key(name, checkpoint, aliases)
    return checkpoint[key].get_tensor(key) if shard is None else shard.read(checkpoint[key], key)


def _shape(checkpoint: dict, name: str, aliases: dict[str, list[str]]) -> list[int]:
    """A checkpoint tensor's shape, read from the file's header; a missing one is reported later as missing."""
    key = _checkpoint_key(name, checkpoint, aliases)
    return [] if key is None else checkpoint[key].get_slice(key).get_shape()


def _converted_by_transformers(ctx: TransformContext) -> dict[str, torch.Tensor]:
    """The checkpoint as transformers loads it (renamed keys, merged experts), on CPU.

    Used only when checkpoint names differ from the model's (e.g. per-expert MoE weights that
    transformers 5 fuses into 3D tensors): it materializes the whole model once, so sharded loading
    of such checkpoints needs a streamed converter instead.
    """
    from transformers import AutoModelForCausalLM

    fmt = checkpoint_format(ctx.source)
    dequantize = {}
    if fmt is not None and fmt.dequantized_on_load:  # MXFP4 experts: transformers' CPU dequantization
        from transformers import Mxfp4Config

        dequantize = {"quantization_config": Mxfp4Config(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(
        ctx.source.path, dtype=ctx.dtype, trust_remote_code=ctx.source.trust_remote_code, **dequantize
    )
    return dict(model.state_dict(keep_vars=False))


def _owner(gm: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr


def _checkpoint_key(name: str, checkpoint: dict, aliases: dict[str, list[str]]) -> str | None:
    for candidate in [name, *aliases.get(name, [])]:
        if candidate in checkpoint:
            return candidate
    return None
