"""The optimize flow: resolve the model, build it on meta, export, run the recipe's transforms."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import GraphModule

import autodeploy.kernels  # noqa: F401  (registers torch.ops.autodeploy.*)
from autodeploy.transforms import TransformContext, TransformReport

from .export import export_causal_lm
from .loading import ModelSource, build_meta_model, resolve_device, resolve_dtype, resolve_model
from .pipeline import run_transforms
from .recipe import Recipe, load_recipe
from .runtime.executor import ModelExecutor
from .runtime.kv_cache import kv_cache_of


@dataclass
class OptimizedModel:
    """The rewritten graph plus everything needed to run and explain it."""

    gm: GraphModule
    source: ModelSource
    recipe: Recipe
    ctx: TransformContext
    reports: list[TransformReport]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for a padded-free batch `input_ids[b, s]` (positions default to 0..s-1)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if kv_cache_of(self.gm) is not None:  # packed-batch interface: prefill each row through the cache
            return ModelExecutor(self.gm).full_logits(input_ids, position_ids)
        return self.gm(input_ids.to(self.device), position_ids.to(self.device))


def optimize_model(
    model: str | os.PathLike | None = None,
    recipe: str | os.PathLike | Recipe | None = None,
    overrides: list[str] | tuple = (),
    progress: bool = True,
    check: Callable[[GraphModule, TransformContext], None] | None = None,
) -> OptimizedModel:
    """Load `model` (hub id, folder, or the default model when None) and optimize it with `recipe`."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    settings = recipe.model
    seconds = {}

    start = time.perf_counter()
    source = resolve_model(model, settings.trust_remote_code, settings.config_only)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, source.config, device)
    meta_model = build_meta_model(source, dtype, settings.attn_implementation)
    seconds["load"] = time.perf_counter() - start

    start = time.perf_counter()
    gm = export_causal_lm(meta_model, recipe.export.max_batch_size, recipe.export.max_seq_len)
    seconds["export"] = time.perf_counter() - start

    ctx = TransformContext(source=source, meta_model=meta_model, device=device, dtype=dtype,
                           quantization=recipe.quantization, parallel=recipe.parallel)
    start = time.perf_counter()
    reports = run_transforms(gm, recipe, ctx, progress=progress, check=check)
    seconds["transforms"] = time.perf_counter() - start
    return OptimizedModel(gm=gm, source=source, recipe=recipe, ctx=ctx, reports=reports, seconds=seconds)
