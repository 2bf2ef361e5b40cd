"""Build cached variants of one optimized model cheaply: the expensive part (export, patterns,
weights) runs once; each variant copies the graph (sharing the weights) and inserts its own cache."""

import copy
import dataclasses
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.fx import GraphModule

from autodeploy.graph_utils import finalize
from autodeploy.optimizer import OptimizedModel, optimize_model
from autodeploy.runtime.scheduler import Scheduler
from autodeploy.transforms.insert_kv_cache import InsertKVCache, InsertKVCacheConfig

NO_CACHE = "transforms.insert_kv_cache.enabled=false"


def with_cache(base: OptimizedModel, **config) -> OptimizedModel:
    gm = GraphModule(base.gm, copy.deepcopy(base.gm.graph))
    InsertKVCache(InsertKVCacheConfig(**config)).apply(gm, base.ctx)
    finalize(gm)
    return dataclasses.replace(base, gm=gm)


def smollm2_cpu_base(model_dir) -> OptimizedModel:
    """The embedded SmolLM2, float32 on the CPU, without a cache (add one per test with `with_cache`)."""
    return optimize_model(model_dir, overrides=["model.device=cpu", "model.dtype=float32", NO_CACHE], progress=False)


@contextmanager
def one_thread() -> Iterator[None]:
    """Decode steps are thousands of tiny ops; on a shared 2-core machine every intra-op parallel
    region waits for a descheduled second thread (measured: 5x slower steps). One thread inside."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_step(sched: Scheduler, token: int = 7):
    """Apply a schedule as the engine would: mark computed, add a token where a chunk completes."""
    out = sched.schedule()
    for c in out.chunks:
        completes = c.completes
        c.seq.num_computed += c.num_tokens
        if completes:
            c.seq.output_ids.append(token)
    return out
