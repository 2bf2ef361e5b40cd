"""`autodeploy zoo`: run the model zoo (or its fast `ci` subset) and write the report."""

from __future__ import annotations

import argparse
import dataclasses

from .zoo import CHECKPOINT_FORMATS


def cmd_sweep(args: argparse.Namespace) -> int:
    """`--all-architectures`: every text causal-LM type of the installed transformers (slow)."""
    from pathlib import Path

    from .sweep import run_sweep, select_types, sweep_markdown

    selection = select_types()
    types = [t for t in selection.types if not args.only or t in args.only]
    print(f"autodeploy zoo --all-architectures: {len(types)} types "
          f"({len(selection.excluded)} excluded by rule)", flush=True)

    def show(result) -> None:
        if result.entry is None:
            verdict = f"HF cannot run it: {result.hf_unsupported[:120]}"
        elif result.entry.passed:
            verdict = "pass"
        else:
            stage, detail = result.entry.first_failure()
            verdict = f"FAIL at {stage}: {detail.detail[:120]}"
        print(f"  {result.model_type:<28} {result.seconds:6.1f} s  {verdict}", flush=True)

    results = run_sweep(types, on_result=show, time_limit=args.time_limit, memory_limit=args.memory_limit)
    report = sweep_markdown(results, selection)
    print()
    print(report.splitlines()[0])
    if args.report is not None:
        path = Path(args.report)
        path.mkdir(parents=True, exist_ok=True)
        (path / "sweep.md").write_text(report)
        print(f"  wrote {path / 'sweep.md'}")
    runnable = [r for r in results if r.entry is not None]
    return 0 if all(r.entry.passed for r in runnable) else 1


def _overrides_after_only(args: argparse.Namespace) -> None:
    """`--only NAME ... key=value`: argparse gives `--only` every word after it; no entry name holds "=", so
    those words are the recipe overrides the user meant."""
    if args.only:
        args.overrides = [*args.overrides, *(w for w in args.only if "=" in w)]
        args.only = [w for w in args.only if "=" not in w]


def cmd_zoo(args: argparse.Namespace) -> int:
    _overrides_after_only(args)
    if args.only == []:
        print("autodeploy zoo: error: --only needs at least one entry name (key=value words are overrides)")
        return 2
    if args.memory_limit < 0:
        print(f"autodeploy zoo: error: --memory-limit must be >= 0 GB (0: none), not {args.memory_limit}")
        return 2
    if args.all_architectures:
        return cmd_sweep(args)
    from .report import summary_line, to_markdown, write_reports
    from .runner import run_zoo
    from .zoo import load_zoo, select

    try:
        entries = select(load_zoo(), args.subset, args.only)
    except ValueError as e:
        print(f"autodeploy zoo: error: {e}")
        return 2
    if args.checkpoint_format:
        entries = [dataclasses.replace(e, checkpoint_format=args.checkpoint_format) for e in entries]

    def show(result) -> None:
        failure = result.first_failure()
        verdict = (f"skipped: {result.skipped}" if result.skipped else "pass" if result.passed
                   else f"FAIL at {failure[0]}: {failure[1].detail}")
        print(f"  {result.name:<24} {result.seconds:5.1f} s  {verdict}", flush=True)

    tp = args.tensor_parallel_size
    if tp < 1:
        print(f"autodeploy zoo: error: --tensor-parallel-size must be >= 1, not {tp}")
        return 2
    print(f"autodeploy zoo: {len(entries)} entries" + (f", each over {tp} ranks" if tp > 1 else ""))
    results = run_zoo(entries, args.overrides, on_result=show, tensor_parallel_size=tp)
    print()
    print(to_markdown(results) if args.report is None else summary_line(results))
    if args.report is not None:
        for path in write_reports(results, args.report):
            print(f"  wrote {path}")
    return 0 if all(r.passed for r in results) else 1


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `zoo` command to the `autodeploy` parser's subparsers."""
    p = subparsers.add_parser(
        "zoo", help="run the model zoo regression suite against HF transformers",
        description="Build each zoo architecture from a tiny config (random weights), optimize it with the "
                    "real pipeline, and compare logits and greedy tokens with HF transformers.")
    p.add_argument("--subset", choices=["ci", "all"], default="all", help="ci: the fast subset the tests run")
    p.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="run only these entries (with --all-architectures: these model types)")
    p.add_argument("--all-architectures", action="store_true",
                   help="instead of the zoo: every text causal-LM type the installed transformers registers, each "
                        "from a tiny config derived from its config class (slow; writes sweep.md with --report)")
    p.add_argument("--time-limit", type=int, default=120, metavar="S",
                   help="with --all-architectures: seconds per type before it counts as failed (0: none)")
    p.add_argument("--memory-limit", type=float, default=8.0, metavar="GB",
                   help="with --all-architectures: memory a type may take beyond what the sweep holds before it "
                        "counts as failed instead of the system killing the run (0: none)")
    p.add_argument("--report", metavar="DIR", default=None, help="write zoo.md, zoo.json and zoo.html to DIR")
    p.add_argument("--checkpoint-format", choices=CHECKPOINT_FORMATS, default=None,
                   help="force every entry's checkpoint layout (hub: as save_pretrained writes; native: "
                        "transformers-5 parameter names)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="run every entry sharded over N ranks (gloo on CPU); entries whose heads do not split "
                        "over N are reported as skipped with the reason")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every entry")
    p.set_defaults(func=cmd_zoo)
    return p
