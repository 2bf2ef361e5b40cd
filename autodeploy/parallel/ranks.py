"""The ranks of `LLM(model, tensor_parallel_size=N)`: start them, watch them, stop them.

Rank 0 is the caller's process. The other N - 1 are either spawned here (torch.multiprocessing,
one device each, a TCP rendezvous on localhost) or, under torchrun, already running: then every
process calls `LLM(...)`, rank 0 returns from it and the others serve steps inside it until rank 0
stops, then exit. One default process group (NCCL on CUDA, gloo on CPU) carries the graphs'
collectives with a 60 s timeout, so a hung peer fails a step instead of hanging it; a second, gloo,
group carries the step metadata (workers wait on it while rank 0 is idle).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autodeploy.errors import RecipeError, WorkerError
from autodeploy.recipe import Recipe

from .channel import Command, StepChannel
from .settings import check_head_counts, head_counts

# NVLink multicast (NVLS / symmetric-memory multicast) stays off in every process we start.
COLLECTIVE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
IDLE_TIMEOUT = timedelta(days=7)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank(rank: int) -> int:
    return int(os.environ.get("LOCAL_RANK", rank))


def for_rank(recipe: Recipe, rank: int) -> Recipe:
    """The recipe one rank optimizes with: its rank, and its own GPU when on CUDA."""
    model = recipe.model
    if torch.cuda.is_available() and model.device in ("auto", "cuda"):
        model = dataclasses.replace(model, device=f"cuda:{local_rank(rank)}")
    return dataclasses.replace(recipe, model=model, parallel=dataclasses.replace(recipe.parallel, rank=rank))


def join_groups(rank: int, world: int, init_method: str) -> StepChannel:
    """Join the default group and the metadata group; the channel rank 0 and the workers share."""
    for key, value in COLLECTIVE_ENV.items():
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank(rank))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return StepChannel(dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT))


def agree_on_cache_blocks(pool, channel: StepChannel) -> None:
    """Every rank sizes its KV cache from its own free memory: all use the smallest count."""
    blocks = torch.tensor([pool.num_blocks], dtype=torch.int64)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=channel.group)
    pool.num_blocks = int(blocks)


def serve_as_worker(rank: int, model, recipe: Recipe, runtime: dict, channel: StepChannel) -> None:
    """A worker's life: optimize its shard, build the same engine as rank 0, run steps until told to stop."""
    from autodeploy.llm import engine_settings
    from autodeploy.optimizer import optimize_model
    from autodeploy.runtime.engine import Engine
    from autodeploy.runtime.kv_cache import kv_cache_of

    from .executor import serve_steps

    optimized = optimize_model(model, for_rank(recipe, rank), progress=False)
    agree_on_cache_blocks(kv_cache_of(optimized.gm), channel)
    config = optimized.source.config.get_text_config()
    engine = Engine(optimized.gm, None, set(), engine_settings(optimized, runtime),
                    getattr(config, "max_position_embeddings", None))
    serve_steps(engine.executor, channel)


def _spawned_worker(index: int, world: int, init_method: str, model, recipe: Recipe, runtime: dict) -> None:
    rank = index + 1
    channel = join_groups(rank, world, init_method)
    try:
        serve_as_worker(rank, model, recipe, runtime, channel)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_fits(model, recipe: Recipe) -> None:
    """The head-count error from the config alone, before any process starts."""
    from autodeploy.loading import resolve_model

    source = resolve_model(model, recipe.model.trust_remote_code, recipe.model.config_only)
    heads = head_counts(source.config.get_text_config())
    if heads is not None:
        check_head_counts(*heads, recipe.parallel.tensor_parallel_size)


class Ranks:
    """Rank 0's handle on the job: the step channel, the spawned workers (none under torchrun)."""

    def __init__(self, channel: StepChannel, processes: list):
        self.channel = channel
        self.processes = processes
        self.closed = False
        channel.alive = self.failure

    @classmethod
    def start(cls, model, recipe: Recipe, runtime: dict) -> "Ranks":
        """Start (or, under torchrun, join) the workers. On a torchrun worker this serves and exits."""
        world = recipe.parallel.tensor_parallel_size
        _check_fits(model, recipe)
        if under_torchrun():
            rank = int(os.environ["RANK"])
            if int(os.environ["WORLD_SIZE"]) != world:
                raise RecipeError(f"torchrun started {os.environ['WORLD_SIZE']} processes but "
                                  f"tensor_parallel_size is {world}")
            channel = join_groups(rank, world, "env://")
            if rank != 0:
                try:
                    serve_as_worker(rank, model, recipe, runtime, channel)
                finally:
                    dist.destroy_process_group()
                raise SystemExit(0)
            return cls(channel, [])
        for key, value in COLLECTIVE_ENV.items():  # inherited by the spawned workers
            os.environ.setdefault(key, value)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        processes = [context.Process(target=_spawned_worker, args=(i, world, init_method, model, recipe, runtime),
                                     daemon=True, name=f"autodeploy-tp-rank{i + 1}") for i in range(world - 1)]
        for p in processes:
            p.start()
        ranks = cls(StepChannel(None), processes)
        try:
            ranks.channel = join_groups(0, world, init_method)
        except Exception:
            gone = ranks.failure()
            ranks.shutdown()
            if gone is None:
                raise
            raise WorkerError(f"{gone} while starting (a script that starts LLM(tensor_parallel_size > 1) "
                              "must do it under `if __name__ == '__main__':`)") from None
        ranks.channel.alive = ranks.failure
        return ranks

    def failure(self) -> str | None:
        """Why a worker is gone (the first that exited), else None."""
        for rank, p in enumerate(self.processes, start=1):
            if not p.is_alive():
                return f"tensor-parallel worker rank {rank} exited (exit code {p.exitcode})"
        return None

    def shutdown(self) -> None:
        """Tell the workers to stop, wait briefly, then make sure none is left. Runs once: a second call
        (LLM.shutdown, then the finalizer) must not destroy the process group a newer LLM made."""
        if self.closed:
            return
        self.closed = True
        if self.channel.group is not None and self.failure() is None:
            try:
                self.channel.deadline_s = 10.0
                self.channel.send(Command.STOP)
            except Exception:  # noqa: BLE001  (a worker already gone: it is stopped below anyway)
                pass
        for p in self.processes:
            p.join(timeout=10)
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()
        self.channel.group = None
