"""Markdown tables of the issue-14 quantization stages (benchmarks/gpu_run.sh 12-18) from their logs.

Usage: python benchmarks/quant_summary.py OUT_DIR  (what the stages wrote; missing files are skipped)
Each figure is set beside the issue's target, so BENCHMARKS.md can take the tables as they are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEMES = ("bf16", "fp8", "fp8_token", "int8", "int4")  # fp8: groups of 128 (the default); fp8_token: per token
# scheme -> (minimum fraction of its own batch-1 ceiling, minimum speed-up over our bf16 at batch 1)
BATCH1_TARGETS = {"bf16": (0.92, None), "fp8": (0.85, 1.8), "fp8_token": (0.85, 1.8), "int4": (0.75, 2.8)}
BATCH64_TARGETS = {"fp8": 1.5, "fp8_token": 1.5}  # minimum speed-up over our bf16 at batch 64


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


BATCH1, BATCH64 = 0, 1  # the latency workloads of stages 12-13, in order (--batch 1,64)


def _tok_s(result: dict, runner: str, workload: int) -> float | None:
    """Output tok/s of `runner` on the run's workload number `workload`."""
    if workload >= len(result["workloads"]):
        return None
    m = result["results"].get(runner, {}).get(result["workloads"][workload]["name"])
    return m["output_tok_s"] if m else None


def _verdict(value: float | None, target: float | None) -> str:
    if target is None or value is None:
        return ""
    return "met" if value >= target else "MISSED"


def _against(value: float | None, target: float | None, spec: str, suffix: str, scale: float = 1) -> str:
    """`value (target verdict)`, the target part only where there is one."""
    shown = _fmt(value and scale * value, spec, suffix)
    if target is None:
        return shown
    return f"{shown} ({_fmt(scale * target, spec, suffix)} {_verdict(value, target)})"


def _fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def decode_table(out: Path) -> list[str]:
    runs = {s: _load(out / f"quant_{s}.json") for s in SCHEMES}
    bf16 = runs["bf16"]
    if bf16 is None and not any(runs.values()):
        return []
    base1 = _tok_s(bf16, "autodeploy", BATCH1) if bf16 else None
    base64 = _tok_s(bf16, "autodeploy", BATCH64) if bf16 else None
    lines = ["| scheme | GB read / token | ceiling tok/s | batch 1 tok/s | % of ceiling (target) | x our bf16 (target) "
             "| batch 64 tok/s | x our bf16 b64 (target) | kv cache tokens |",
             "| --- | ---: | ---: | ---: | --- | --- | ---: | --- | ---: |"]
    for scheme, r in runs.items():
        if r is None:
            continue
        b1, b64 = _tok_s(r, "autodeploy", BATCH1), _tok_s(r, "autodeploy", BATCH64)
        frac = b1 / r["ceiling_batch1_tok_s"] if b1 else None
        x1 = b1 / base1 if b1 and base1 else None
        x64 = b64 / base64 if b64 and base64 else None
        frac_target, x1_target = BATCH1_TARGETS.get(scheme, (None, None))
        x64_target = BATCH64_TARGETS.get(scheme)
        lines.append(
            f"| {scheme} | {r['bytes_per_token'] / 1e9:.2f} | {r['ceiling_batch1_tok_s']:.1f} | {_fmt(b1)} "
            f"| {_against(frac, frac_target, '.1f', ' %', 100)} | {_against(x1, x1_target, '.2f', 'x')} "
            f"| {_fmt(b64)} | {_against(x64, x64_target, '.2f', 'x')} | {r['kv_cache']['tokens']:,} |")
    compiled = _load(out / "quant_hf_compile.json")
    for peer, r in (("hf", bf16), ("hf-compile", compiled)):
        if r is not None:
            p1, p64 = _tok_s(r, peer, BATCH1), _tok_s(r, peer, BATCH64)
            if p1 or p64:
                lines.append(f"| {peer} (bf16 peer) | | | {_fmt(p1)} | | | {_fmt(p64)} | | |")
    if bf16:
        hf64 = _tok_s(bf16, "hf", BATCH64)
        if hf64 and base64:
            lines.append(f"\nour bf16 batch 64 / HF eager batch 64: {base64 / hf64:.2f}x (target 3x "
                         f"{_verdict(base64 / hf64, 3.0)})")
        lines.insert(0, f"{bf16['device']}, torch {bf16['torch']}, triton {bf16['triton']}, copy bandwidth "
                        f"{bf16['copy_bandwidth_GBps']:,.0f} GB/s (bf16 run)\n")
    return lines


def perplexity_table(out: Path) -> list[str]:
    names = {"none": "bf16", "algo_fp8": "fp8 W8A8", "algo_int8": "int8 weight-only", "algo_int4": "int4 g32",
             "kv_cache_dtype_fp8": "bf16 + fp8 KV cache"}
    runs = {label: _load(out / f"ppl_{key}.json") for key, label in names.items()}
    base = runs["bf16"]
    if not any(runs.values()):
        return []
    lines = ["| scheme | perplexity | rise vs bf16 | tokens (windows x size) |", "| --- | ---: | ---: | --- |"]
    for label, r in runs.items():
        if r is None:
            continue
        rise = 100 * (r["perplexity"] / base["perplexity"] - 1) if base else None
        lines.append(f"| {label} | {r['perplexity']:.4f} | {_fmt(rise, '+.2f', ' %')} | "
                     f"{r['tokens']} ({r['windows']} x {r['window']}) |")
    return lines


def kv_table(out: Path) -> list[str]:
    lines = ["| workload | kv cache | tokens it holds | output tok/s | tok/s/seq | ITL p50 / p99 ms |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for name in ("quant_bf16", "kv_fp8_b64", "kv_fp8_long", "kv_bf16_throughput", "kv_fp8_throughput"):
        r = _load(out / f"{name}.json")
        if r is None:
            continue
        w = r["workloads"][-1]  # quant_bf16 (the bf16-cache batch 64): its second workload
        m = r["results"]["autodeploy"][w["name"]]
        kv = r["kv_cache"]
        lines.append(f"| {w['name']} | {kv['dtype']} | {kv['tokens']:,} | {m['output_tok_s']:,.1f} | "
                     f"{m['decode_tok_s_per_seq']:.1f} | {m['itl_ms']['p50']:.2f} / {m['itl_ms']['p99']:.2f} |")
    return lines if len(lines) > 2 else []


def startup_lines(out: Path) -> list[str]:
    lines = []
    for name, label in (("startup", "bf16"), ("startup_fp8", "fp8")):
        log = out / f"{name}.log"
        if not log.is_file():
            continue
        text = log.read_text()
        start = text.rfind("\n{")
        try:
            r = json.loads(text[start + 1:] if start >= 0 else text)
        except json.JSONDecodeError:
            lines.append(f"- {label}: no result (see {log.name})")
            continue
        lines.append(f"- {label}: LLM(...) {r['llm_init_s']:.1f} s, first token {r['first_token_s']:.1f} s")
    return lines


def correctness_lines(out: Path) -> list[str]:
    r = _load(out / "correctness_smollm2.json")
    if r is None:
        return []
    return [f"- SmolLM2 bf16 vs HF eager: top-k rule {'passed' if r['passed'] else 'FAILED'}, greedy tokens "
            f"{'identical' if r['ours_tokens'] == r['hf_tokens'] else 'differ'} over {len(r['ours_tokens'])} prompts"]


def main(out: Path) -> None:
    for title, lines in (("Quantized decode (8B shape, random weights)", decode_table(out)),
                         ("SmolLM2 perplexity on the GPU", perplexity_table(out)),
                         ("FP8 KV cache", kv_table(out)),
                         ("Startup", startup_lines(out)), ("Correctness", correctness_lines(out))):
        if lines:
            print(f"### {title}\n")
            print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
