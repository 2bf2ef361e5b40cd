"""`autodeploy zoo`: run the model zoo (or its fast `ci` subset) and write the report."""

from __future__ import annotations

import argparse
import dataclasses

from .zoo import CHECKPOINT_FORMATS


def cmd_zoo(args: argparse.Namespace) -> int:
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
        verdict = "pass" if result.passed else f"FAIL at {failure[0]}: {failure[1].detail}"
        print(f"  {result.name:<24} {result.seconds:5.1f} s  {verdict}", flush=True)

    print(f"autodeploy zoo: {len(entries)} entries")
    results = run_zoo(entries, args.overrides, on_result=show)
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
    p.add_argument("--only", nargs="+", metavar="NAME", default=None, help="run only these entries")
    p.add_argument("--report", metavar="DIR", default=None, help="write zoo.md, zoo.json and zoo.html to DIR")
    p.add_argument("--checkpoint-format", choices=CHECKPOINT_FORMATS, default=None,
                   help="force every entry's checkpoint layout (hub: as save_pretrained writes; native: "
                        "transformers-5 parameter names)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every entry")
    p.set_defaults(func=cmd_zoo)
    return p
