"""From per-token timestamps to the figures a benchmark reports.

Every runner returns, for each timed run, one list of timestamps per request (seconds since the
requests were submitted, taken after a device synchronization): when each output token was on the
host. TTFT is a request's first timestamp, inter-token latencies are the gaps between consecutive
ones, output tok/s is all output tokens over the run's wall time.
"""

from __future__ import annotations

from dataclasses import dataclass

TokenTimes = list[list[float]]  # [request][token] -> seconds since submission


@dataclass
class Run:
    times: TokenTimes
    wall_s: float


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), p in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = p / 100 * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {"mean": sum(ms) / len(ms) if ms else float("nan"),
            "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99)}


def summarize(runs: list[Run]) -> dict:
    """TTFT and inter-token latency over all timed runs; tok/s of the median run."""
    ttft = [t[0] for run in runs for t in run.times if t]
    itl = [b - a for run in runs for t in run.times for a, b in zip(t, t[1:])]
    rates = sorted(sum(len(t) for t in run.times) / run.wall_s for run in runs)
    itl_ms = _stats_ms(itl)
    return {
        "runs": len(runs),
        "output_tok_s": rates[len(rates) // 2],
        "output_tok_s_all_runs": rates,
        "ttft_ms": _stats_ms(ttft),
        "itl_ms": itl_ms,
        "decode_tok_s_per_seq": 1e3 / itl_ms["mean"] if itl else float("nan"),
        "wall_s": sorted(run.wall_s for run in runs)[len(runs) // 2],
    }
