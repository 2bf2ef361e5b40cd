"""Where a decode step's time goes: torch.profiler over a few all-decode steps of the engine; and where a
prefill goes: the same table over passes of a workload's prompts alone (`prefill_profile`).

The profiler's schedule only advances once every request is decoding (prefill chunks, which the
decode-aware bound spreads over many steps at large batch, never enter the window), then `steps` decode
steps are recorded; the table lists the ops/kernels with the most device time (host time on CPU) per step,
next to the wall time per step, so the gap between them is the host's share. With programmatic
dependent launch (kernels/triton_pdl.py) a kernel starts, and waits, while its predecessor runs, so
each kernel's time includes some of its predecessor's and the sum exceeds the step: the table then
ranks kernels but no longer splits the step.
"""

from __future__ import annotations

import time

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from autodeploy.runtime.engine import Engine

from . import ours


def decode_profile(engine: Engine, prompts: list[list[int]], steps: int = 5, top: int = 15) -> dict:
    device = engine.executor.device
    scheduler = engine.scheduler
    # an upper bound on the steps before all requests decode: the smallest prefill share of a step
    chunk = max(1, min(scheduler.max_num_tokens, scheduler.max_prefill_tokens_with_decodes // 4))
    prefill_steps = -(-sum(map(len, prompts)) // chunk) + 2
    stamps: list[float] = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    warmup = 2  # the step in flight when the last prefill was scheduled, and one to settle
    with profile(activities=activities, schedule=schedule(wait=1, warmup=warmup, active=steps, repeat=1)) as prof:
        def after_step() -> None:
            if stamps or _all_decoding(scheduler):
                stamps.append(time.perf_counter())
                prof.step()

        ours.run(engine, prompts, [prefill_steps + warmup + steps + 3] * len(prompts), after_step)
    if len(stamps) < 1 + warmup + steps:
        raise RuntimeError(f"only {len(stamps)} all-decode steps ran; the profile needs {1 + warmup + steps}")
    first = warmup  # stamps[i] ends gated step i; the active steps are 1 + warmup ..
    wall_ms = (stamps[first + steps] - stamps[first]) / steps * 1e3
    return {"batch": len(prompts), "steps": steps, "wall_ms_per_step": wall_ms,
            **_kernel_table(prof, device.type == "cuda", steps, top, "step")}


def prefill_profile(engine: Engine, prompts: list[list[int]], passes: int = 3, top: int = 15) -> dict:
    """Kernels of `passes` runs of the prompts alone (one new token each, an empty prefix cache): a prefill's cost
    per pass, in the steps the scheduler makes of it under the token budget."""
    ours.run(engine, prompts, [1] * len(prompts))  # warm: compilation, allocator growth
    on_gpu = engine.executor.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        walls = [ours.run(engine, prompts, [1] * len(prompts)).wall_s for _ in range(passes)]
    return {"batch": len(prompts), "prompt_tokens": sum(map(len, prompts)), "passes": passes,
            "wall_ms_per_pass": sum(walls) / passes * 1e3, **_kernel_table(prof, on_gpu, passes, top, "pass")}


def _kernel_table(prof, on_gpu: bool, per: int, top: int, unit: str) -> dict:
    """The events with the most device time (host time on CPU), per `unit` (step or pass) over `per` of them."""
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    # On the GPU, the kernels themselves (an op's device time would count its kernels twice); the
    # profiler's own step annotation spans the whole step, so it is no kernel either.
    events = [e for e in prof.key_averages()
              if getattr(e, key) > 0 and not e.key.startswith("ProfilerStep")
              and (not on_gpu or e.device_type == DeviceType.CUDA)]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total_us = sum(getattr(e, key) for e in events)
    return {f"{'device' if on_gpu else 'cpu'}_ms_per_{unit}": total_us / per / 1e3,
            "top": [{"name": e.key[:120], f"calls_per_{unit}": e.count / per,
                     f"ms_per_{unit}": getattr(e, key) / per / 1e3} for e in events[:top]]}


def _all_decoding(scheduler) -> bool:
    """No request waits or still has prompt tokens to run."""
    return not scheduler.waiting and all(seq.num_pending <= 1 for seq in scheduler.running)
