"""The benchmark's table on stdout (the JSON file holds everything)."""

from __future__ import annotations

REFERENCE = "hf"  # speed-ups are against HF eager, measured in the same run


def _row(runner: str, m: dict, ref: dict | None) -> tuple[str, ...]:
    speedup = f"{m['output_tok_s'] / ref['output_tok_s']:.2f}x" if ref else ""
    return (runner, f"{m['output_tok_s']:.1f}", f"{m['decode_tok_s_per_seq']:.1f}", f"{m['ttft_ms']['p50']:.1f}",
            f"{m['itl_ms']['p50']:.2f}/{m['itl_ms']['p90']:.2f}/{m['itl_ms']['p99']:.2f}", speedup)


def print_report(result: dict) -> None:
    print(f"autodeploy bench {result['model']}  ({result['device']}, {result['dtype']}, torch {result['torch']}, "
          f"transformers {result['transformers']}, triton {result['triton']})")
    if "weights_note" in result:
        print(f"  note: {result['weights_note']}")
    if "weight_bytes" in result:  # our model was built (not --peers-only)
        q = result["quantization"]
        scheme = q["algo"] + (f" (group {q['group_size']})" if q["algo"] in ("int4", "int8") else "")
        print(f"  quantization {scheme}; weights {result['weight_bytes'] / 1e9:.2f} GB ("
              + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in result["weight_bytes_by_dtype"].items()) + ")")
        for w in result.get("warnings", []):
            print(f"  warning: {w}")
        print(f"  copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s (read+write), {result['bytes_per_token'] / 1e9:.2f} GB "
              f"read per decode token -> batch-1 decode ceiling {result['ceiling_batch1_tok_s']:.1f} tok/s")
        kv = result["kv_cache"]
        if kv is not None:
            print(f"  kv cache {kv['dtype']}: {kv['tokens']:,} tokens ({kv['blocks']:,} blocks of {kv['block_size']}), "
                  f"{kv['bytes'] / 1e9:.2f} GB")
        print(f"  build {result['build_s']['total']:.1f} s; engine start (graph capture) "
              + ", ".join(f"{k} {v['start_s']:.1f} s" for k, v in result["engine"].items()))
    else:
        print(f"  copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s (read+write); peers only")
    header = ("runner", "output tok/s", "tok/s/seq", "TTFT p50 ms", "ITL p50/p90/p99 ms", "vs HF eager")
    for w in result["workloads"]:
        print(f"\n  {w['name']}  ({w['requests']} requests, {w['output_tokens']} output tokens)")
        rows = [header]
        for runner, by_workload in result["results"].items():
            ref = result["results"].get(REFERENCE, {}).get(w["name"])
            rows.append(_row(runner, by_workload[w["name"]], ref))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            print("    " + "  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(row, widths))))
    for kind, unit in (("profile", "step"), ("prefill_profile", "pass")):
        for runner, by_workload in result.get(kind, {}).items():
            for name, prof in by_workload.items():
                total = f"device_ms_per_{unit}" if f"device_ms_per_{unit}" in prof else f"cpu_ms_per_{unit}"
                what = "profile" if unit == "step" else f"prefill profile ({prof['prompt_tokens']} prompt tokens)"
                print(f"\n  {what} {runner}, {name}: {prof[f'wall_ms_per_{unit}']:.2f} ms/{unit} wall, "
                      f"{prof[total]:.2f} {total.replace('_', ' ')} (kernels summed: overlapping kernels count twice)")
                for e in prof["top"][:10]:
                    print(f"    {e[f'ms_per_{unit}']:8.3f} ms  x{e[f'calls_per_{unit}']:<5.0f} {e['name'][:90]}")
