"""The transform interface: a named, staged graph -> graph rewrite with a typed config and a report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from autodeploy.quantization.settings import QuantizationSettings


class Stage(IntEnum):
    """Pipeline stages, in the order they must run (DESIGN.md, data flow step 3)."""

    PATTERN = 1
    SHARDING = 2
    QUANTIZATION = 3
    WEIGHT_LOADING = 4
    FUSION = 5
    CACHE = 6
    COMPILE = 7


@dataclass
class TransformConfig:
    """Every transform's config has at least `enabled`; subclasses add typed fields."""

    enabled: bool = True


@dataclass
class TransformContext:
    """What transforms may consult besides the graph: the model they came from and where it runs."""

    source: Any  # autodeploy.loading.ModelSource
    meta_model: torch.nn.Module  # the HF model on meta: module attributes (sliding_window, scaling, ...)
    device: torch.device
    dtype: torch.dtype
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)  # the recipe's section
    parallel: Any = None  # autodeploy.parallel.settings.ParallelSettings (None: one rank)


@dataclass
class TransformReport:
    name: str
    stage: str
    enabled: bool
    seconds: float = 0.0
    matched: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Transform:
    """Subclass, set `name`, `stage` and `config_cls`, implement `apply`, and decorate with `register`."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    config_cls: ClassVar[type[TransformConfig]] = TransformConfig

    def __init__(self, config: TransformConfig | None = None):
        self.config = config if config is not None else self.config_cls()
        self.warnings: list[str] = []  # what `apply` could not do, named (shown in the report)

    def apply(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """Rewrite `gm` in place; return how many things of each kind were matched/changed."""
        raise NotImplementedError

    def expected(self, gm: GraphModule, ctx: TransformContext) -> dict[str, int]:
        """Matches this model should give per kind, where knowable (e.g. one attention per layer).

        A count below this becomes a visible warning in the report instead of silence.
        """
        return {}


TRANSFORMS: dict[str, type[Transform]] = {}


def register(cls: type[Transform]) -> type[Transform]:
    if cls.name in TRANSFORMS:
        raise ValueError(f"transform '{cls.name}' registered twice")
    TRANSFORMS[cls.name] = cls
    return cls
