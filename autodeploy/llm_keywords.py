"""The keywords vLLM and TensorRT-LLM users pass to `LLM(...)`, mapped onto our recipe and runtime.

Users arrive with `LLM(path, dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.8)`.
Each such keyword is one row of a table: a runtime setting under another name, a recipe key, or a
small conversion. Other features add their keywords as rows here. Anything unknown is refused with
its own name and the full list of valid ones.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

from .runtime.settings import EngineSettings

RUNTIME_ALIASES = {  # vLLM / TensorRT-LLM name -> EngineSettings field
    "max_model_len": "max_seq_len",
    "max_num_seqs": "max_batch_size",
    "max_num_batched_tokens": "max_num_tokens",
}

_DTYPE_NAMES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dtype(value: Any) -> str:
    name = str(value).removeprefix("torch.")
    return _DTYPE_NAMES.get(name, name)


RECIPE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {  # keyword -> (recipe key, value conversion)
    "dtype": ("model.dtype", _dtype),
    "device": ("model.device", str),
    "trust_remote_code": ("model.trust_remote_code", bool),
    # vLLM's share is of the whole GPU; ours is of the memory left free after the weights
    "gpu_memory_utilization": ("transforms.insert_kv_cache.free_memory_fraction", float),
    "kv_cache_free_gpu_memory_fraction": ("transforms.insert_kv_cache.free_memory_fraction", float),  # TRT-LLM
    "block_size": ("transforms.insert_kv_cache.block_size", int),
    # None: what the checkpoint says, else unquantized (the recipe's `auto`)
    "quantization": ("quantization.algo", lambda v: "auto" if v is None else str(v)),
    "kv_cache_dtype": ("quantization.kv_cache_dtype", lambda v: "auto" if v is None else str(v)),
    "tensor_parallel_size": ("parallel.tensor_parallel_size", int),
    "enable_expert_parallel": ("parallel.enable_expert_parallel", bool),
}


def _enforce_eager(value: Any) -> dict:
    return {"cuda_graph_batch_sizes": (), "cuda_graph_prefill_tokens": ()} if value else {}


RUNTIME_CONVERSIONS: dict[str, Callable[[Any], dict]] = {  # keyword -> the runtime settings it means
    "enforce_eager": _enforce_eager,
}


def valid_keywords() -> list[str]:
    runtime = {f.name for f in fields(EngineSettings)}
    return sorted(runtime | set(RUNTIME_ALIASES) | set(RECIPE_KEYS) | set(RUNTIME_CONVERSIONS))


def translate(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`LLM(...)` keywords as (runtime settings, recipe overrides); dotted keys are recipe keys as given."""
    runtime_keys = {f.name for f in fields(EngineSettings)}
    unknown = [k for k in kwargs if "." not in k and k not in valid_keywords()]
    if unknown:
        raise TypeError(f"unknown LLM arguments {unknown}: use {valid_keywords()} or dotted recipe keys")
    runtime: dict[str, Any] = {}
    overrides: list[str] = []
    for key, value in kwargs.items():
        if "." in key:
            overrides.append(f"{key}={value}")
        elif key in runtime_keys:
            runtime[key] = value
        elif key in RUNTIME_ALIASES:
            runtime[RUNTIME_ALIASES[key]] = value
        elif key in RECIPE_KEYS:
            recipe_key, convert = RECIPE_KEYS[key]
            overrides.append(f"{recipe_key}={convert(value)}")
        else:
            runtime.update(RUNTIME_CONVERSIONS[key](value))
    return runtime, overrides
