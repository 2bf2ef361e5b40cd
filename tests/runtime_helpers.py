"""Build cached variants of one optimized model cheaply: the expensive part (export, patterns,
weights) runs once; each variant copies the graph (sharing the weights) and inserts its own cache."""

import copy
import dataclasses

from torch.fx import GraphModule

from autodeploy.graph_utils import finalize
from autodeploy.optimizer import OptimizedModel
from autodeploy.transforms.insert_kv_cache import InsertKVCache, InsertKVCacheConfig

NO_CACHE = "transforms.insert_kv_cache.enabled=false"


def with_cache(base: OptimizedModel, **config) -> OptimizedModel:
    gm = GraphModule(base.gm, copy.deepcopy(base.gm.graph))
    InsertKVCache(InsertKVCacheConfig(**config)).apply(gm, base.ctx)
    finalize(gm)
    return dataclasses.replace(base, gm=gm)
