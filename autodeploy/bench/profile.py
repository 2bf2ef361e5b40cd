"""Where a decode step's time goes: torch.profiler over a few all-decode steps of the engine.

The requests' prefill steps are skipped (profiler schedule `wait`), then `steps` decode steps are
recorded; the table lists the ops/kernels with the most device time (host time on CPU) per step,
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
    budget = engine.scheduler.max_num_tokens
    wait = -(-sum(map(len, prompts)) // budget) + 1  # prefill steps, then one decode step to settle
    stamps: list[float] = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=steps, repeat=1)) as prof:
        def after_step() -> None:
            stamps.append(time.perf_counter())
            prof.step()

        ours.run(engine, prompts, [wait + steps + 3] * len(prompts), after_step)
    on_gpu = device.type == "cuda"
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    # On the GPU, the kernels themselves (an op's device time would count its kernels twice); the
    # profiler's own step annotation spans the whole step, so it is no kernel either.
    events = [e for e in prof.key_averages()
              if getattr(e, key) > 0 and not e.key.startswith("ProfilerStep")
              and (not on_gpu or e.device_type == DeviceType.CUDA)]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total_us = sum(getattr(e, key) for e in events)
    profiled = stamps[wait + 1:wait + 1 + steps]  # stamps[i] ends step i; the active steps
    wall_ms = (profiled[-1] - stamps[wait]) / len(profiled) * 1e3
    return {
        "batch": len(prompts),
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "device_ms_per_step" if on_gpu else "cpu_ms_per_step": total_us / steps / 1e3,
        "top": [{"name": e.key[:120], "calls_per_step": e.count / steps,
                 "ms_per_step": getattr(e, key) / steps / 1e3} for e in events[:top]],
    }
