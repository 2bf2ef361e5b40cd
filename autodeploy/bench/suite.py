"""One benchmark run: the ceiling, the HF peers, then autodeploy, over the same workloads.

Order matters on one GPU: the copy bandwidth first (an idle device), then each HF peer (built,
measured on every workload, freed), then our model - last, because the KV cache takes most of
the memory that is free when it is built. Every runner gets warm-up passes (compilation,
autotuning, allocator growth) before its timed passes.
"""

from __future__ import annotations

import datetime
import gc
from dataclasses import dataclass, field, replace

import torch

from autodeploy.graph_utils import weight_bytes
from autodeploy.loading import resolve_device, resolve_dtype, resolve_model
from autodeploy.optimizer import optimize_model
from autodeploy.recipe import load_recipe
from autodeploy.runtime.kv_cache import kv_cache_of

from . import hf, ours
from .device import bytes_by_dtype, bytes_read_per_token, copy_bandwidth, describe, now
from .metrics import Run, summarize
from .profile import decode_profile, prefill_profile
from .workload import Workload, random_prompts

GRAPH_MODES = {"on": [True], "off": [False], "both": [True, False]}


@dataclass
class BenchConfig:
    model: str | None
    workloads: list[Workload]
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)  # hf | hf-compile
    cuda_graphs: str = "on"  # on | off | both
    warmup: int = 1
    repeats: int = 3
    max_batch_size: int | None = None  # default: the largest latency batch, at least runtime.max_batch_size
    max_num_tokens: int | None = None
    seed: int = 0
    profile_steps: int = 0  # > 0: profile that many decode steps per latency workload
    profile_prefill: int = 0  # > 0: profile that many passes of each latency workload's prompts alone
    peers_only: bool = False  # measure the baselines alone (a peer too slow to share a run with ours)
    prefix_caching: str = "auto"  # on | off | both; auto: both for a shared-prefix workload, else the recipe's


def _prefix_caching_modes(cfg: BenchConfig, default: bool) -> list[bool]:
    if cfg.prefix_caching == "auto":
        return [True, False] if any(w.mode == "shared-prefix" for w in cfg.workloads) else [default]
    return GRAPH_MODES[cfg.prefix_caching]


def _timed(passes: int, warmup: int, one_pass) -> list[Run]:
    for _ in range(warmup):
        one_pass()
    return [one_pass() for _ in range(passes)]


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()  # compiled HF forwards hold their model and CUDA graph pools
        torch.cuda.empty_cache()


def _kv_cache_capacity(gm) -> dict | None:
    """Tokens the paged cache holds (an fp8 cache holds ~2x a bf16 one in the same memory)."""
    pool = kv_cache_of(gm)
    if pool is None:
        return None
    caches = pool.graph_inputs()
    return {"dtype": str(caches[0].dtype).removeprefix("torch."), "blocks": pool.num_blocks,
            "block_size": pool.block_size, "tokens": pool.num_blocks * pool.block_size,
            "bytes": sum(c.numel() * c.element_size() for c in caches)}


def run_bench(cfg: BenchConfig) -> dict:
    recipe = load_recipe(cfg.recipe, cfg.overrides)
    source = resolve_model(cfg.model, recipe.model.trust_remote_code, recipe.model.config_only)
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, source.config, device)
    vocab = source.config.get_text_config().vocab_size
    prompts = [random_prompts(w, vocab, cfg.seed + i) for i, w in enumerate(cfg.workloads)]
    lens = [[r.output_len for r in w.requests] for w in cfg.workloads]
    max_batch = cfg.max_batch_size or max([recipe.runtime.max_batch_size]
                                          + [len(w.requests) for w in cfg.workloads if w.mode == "latency"])
    result = {
        "model": source.name, "date": datetime.date.today().isoformat(), **describe(device),
        "dtype": str(dtype).removeprefix("torch."), "config_only": not source.weight_files,
        "max_batch_size": max_batch, "warmup": cfg.warmup, "repeats": cfg.repeats,
        "workloads": [{"name": w.name, "mode": w.mode, "requests": len(w.requests),
                       "output_tokens": w.output_tokens} for w in cfg.workloads],
        "results": {},  # runner -> workload name -> metrics
    }
    if not source.weight_files and cfg.baselines:
        result["weights_note"] = ("random weights from the config; the HF peers' random weights differ from "
                                  "ours (same seed, different init order) - speed does not depend on values")
    result["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9

    for name in cfg.baselines:
        model = hf.build_hf_model(source, dtype, device, cfg.seed)
        result["results"][name] = {
            w.name: summarize(_timed(cfg.repeats, cfg.warmup, lambda: hf.run(model, p, n, max_batch, name)))
            for w, p, n in zip(cfg.workloads, prompts, lens)}
        del model
        _free_device_memory()
    if cfg.peers_only:
        return result

    start = now(device)
    llm = _sharded_llm(cfg, max_batch) if recipe.parallel.tensor_parallel_size > 1 else None
    opt = llm.model if llm is not None else optimize_model(cfg.model, recipe, progress=False)
    result["build_s"] = {**opt.seconds, "total": now(device) - start}
    result["tensor_parallel_size"] = recipe.parallel.tensor_parallel_size  # > 1: the weights and ceiling are rank 0's
    result["transforms"] = {r.name: {k: v for k, v in r.matched.items() if v} for r in opt.reports if r.enabled}
    result["warnings"] = [w for r in opt.reports for w in r.warnings]
    quant = recipe.quantization
    result["quantization"] = {"algo": quant.algo, "group_size": quant.nominal_group_size, "symmetric": quant.symmetric,
                              "kv_cache_dtype": quant.kv_cache_dtype, "act_quant": quant.act_quant}
    result["weight_bytes"] = weight_bytes(opt.gm)
    result["weight_bytes_by_dtype"] = bytes_by_dtype(opt.gm)
    result["bytes_per_token"] = bytes_read_per_token(opt.gm)
    result["ceiling_batch1_tok_s"] = result["copy_bandwidth_GBps"] * 1e9 / result["bytes_per_token"]
    result["kv_cache"] = _kv_cache_capacity(opt.gm)
    try:
        for runner, engine, start_s in _engines(cfg, opt, llm, recipe.runtime, max_batch, device):
            graphs_ = engine.executor.graphs
            captured = [[b.tokens, b.seqs] for b in graphs_.buckets] if graphs_ is not None else []
            result.setdefault("engine", {})[runner] = {"start_s": start_s, "cuda_graph_buckets": captured}
            result["results"][runner] = {
                w.name: summarize(_timed(cfg.repeats, cfg.warmup,
                                         lambda: ours.run(engine, p, n, warm_prefix=p[0][:w.prefix_len])))
                for w, p, n in zip(cfg.workloads, prompts, lens)}
            result["engine"][runner]["stats"] = engine.stats()
            if cfg.profile_steps:
                result.setdefault("profile", {})[runner] = {
                    w.name: decode_profile(engine, p, cfg.profile_steps)
                    for w, p in zip(cfg.workloads, prompts) if w.mode == "latency"}
            if cfg.profile_prefill:
                result.setdefault("prefill_profile", {})[runner] = {
                    w.name: prefill_profile(engine, p, cfg.profile_prefill)
                    for w, p in zip(cfg.workloads, prompts) if w.mode == "latency"}
            del engine
            _free_device_memory()
    finally:
        if llm is not None:
            llm.shutdown()
    return result


def _sharded_llm(cfg: BenchConfig, max_batch: int):
    """Tensor parallelism: an LLM whose rank 0 (here) drives the N - 1 workers it starts."""
    from autodeploy.llm import LLM

    sizes = {"max_num_tokens": cfg.max_num_tokens} if cfg.max_num_tokens else {}
    return LLM(cfg.model, cfg.recipe, overrides=cfg.overrides, max_batch_size=max_batch, **sizes)


def _engines(cfg: BenchConfig, opt, llm, runtime, max_batch: int, device):
    """(runner, engine, seconds to start it) per CUDA-graph / prefix-caching mode; a sharded model runs the
    one engine its LLM started (every rank built it with the recipe's runtime settings)."""
    if llm is not None:
        yield f"autodeploy-tp{opt.recipe.parallel.tensor_parallel_size}", llm.engine, 0.0
        return
    modes = [(g, c) for g in (GRAPH_MODES[cfg.cuda_graphs] if device.type == "cuda" else [False])
             for c in _prefix_caching_modes(cfg, runtime.enable_prefix_caching)]
    for graphs, caching in modes:
        settings = replace(runtime, max_batch_size=max_batch, max_num_tokens=cfg.max_num_tokens or runtime.max_num_tokens,
                           cuda_graph_batch_sizes=runtime.cuda_graph_batch_sizes if graphs else (),
                           cuda_graph_prefill_tokens=runtime.cuda_graph_prefill_tokens if graphs else (),
                           enable_prefix_caching=caching)
        start = now(device)
        engine = ours.make_engine(opt, settings)
        runner = ("autodeploy-eager" if device.type == "cuda" and not graphs else "autodeploy") + (
            "" if caching else "-no-prefix-cache")
        yield runner, engine, now(device) - start
