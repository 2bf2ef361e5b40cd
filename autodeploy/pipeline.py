"""Runs a recipe's transforms over a graph, in stage order, each followed by a validity check."""

from __future__ import annotations

import time
from typing import Callable

from torch.fx import GraphModule

from autodeploy.transforms import TRANSFORMS, TransformContext, TransformReport

from .graph_utils import count_nodes, finalize
from .recipe import Recipe


def run_transforms(
    gm: GraphModule,
    recipe: Recipe,
    ctx: TransformContext,
    progress: bool = True,
    check: Callable[[GraphModule, TransformContext], None] | None = None,
) -> list[TransformReport]:
    """Apply every transform of `recipe` to `gm` in place and return one report per transform.

    `check(gm, ctx)` runs after each transform (tests pass one that executes the graph).
    """
    from tqdm.auto import tqdm

    reports = []
    bar = tqdm(recipe.transforms.items(), desc="transforms", unit="t", disable=not progress, leave=False)
    for name, config in bar:
        cls = TRANSFORMS[name]
        bar.set_postfix_str(name)
        report = TransformReport(name=name, stage=cls.stage.name.lower(), enabled=config.enabled)
        reports.append(report)
        if not config.enabled:
            continue
        transform = cls(config)
        report.nodes_before = count_nodes(gm)
        start = time.perf_counter()
        matched = transform.apply(gm, ctx)
        finalize(gm)
        report.seconds = time.perf_counter() - start
        report.nodes_after = count_nodes(gm)
        report.matched = {k: int(v) for k, v in matched.items()}
        report.warnings.extend(transform.warnings)
        for kind, want in transform.expected(gm, ctx).items():
            got = report.matched.get(kind, 0)
            if got < want:
                report.warnings.append(f"{name}: matched {got} {kind} but the model has {want}")
        if check is not None:
            check(gm, ctx)
    return reports
