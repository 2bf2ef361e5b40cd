"""The `autodeploy` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AutoDeployError
from .quantization.cli_args import add_quantization_args, quantization_overrides

DEMO_PROMPT = "What is the capital of France?"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--recipe", default=None, help="built-in recipe name or YAML path (default: default)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted recipe overrides, e.g. transforms.match_rope.enabled=false model.dtype=bfloat16")
    p.add_argument("--config-only", action="store_true",
                   help="random weights from the model's config alone (no checkpoint needed)")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks")
    add_quantization_args(p)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="shard the model over N ranks (devices; gloo processes on CPU)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE: whole experts per rank instead of tensor parallelism inside each expert")


def _split_overrides(args) -> None:
    """argparse puts a lone `key=value` in `model`; move it where it belongs. Flags become overrides."""
    if args.model is not None and "=" in args.model:
        args.overrides.insert(0, args.model)
        args.model = None
    if args.config_only:
        args.overrides.append("model.config_only=true")
    args.overrides.extend(quantization_overrides(args))
    if args.tensor_parallel_size is not None:
        args.overrides.append(f"parallel.tensor_parallel_size={args.tensor_parallel_size}")
    if args.enable_expert_parallel:
        args.overrides.append("parallel.enable_expert_parallel=true")


def _chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """One user turn through the chat template, or the plain text where the tokenizer has none."""
    from .llm import chat_prompt_ids

    if getattr(tokenizer, "chat_template", None):
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text)["input_ids"]


def check_at_least(error: type[Exception], bounds: dict[str, tuple[int | None, int]]) -> None:
    """Each flag's value (None: unset) at least its bound, else `error` naming the flag: a one-line check before a
    model loads. bounds: flag -> (value, least)."""
    for flag, (value, least) in bounds.items():
        if value is not None and value < least:
            raise error(f"{flag} must be >= {least}, got {value}")


def print_warnings(reports) -> None:
    """The transforms' warnings (a linear left unquantized, a group size that fell back), one line each on stderr:
    what generate / chat / serve / eval-ppl / bench would otherwise drop, `optimize` printing them with its table."""
    for r in reports:
        for w in r.warnings:
            print(f"[autodeploy] warning: {w}", file=sys.stderr, flush=True)


def _print_table(reports) -> None:
    rows = [("transform", "stage", "matched", "nodes", "seconds")]
    for r in reports:
        matched = ", ".join(f"{k}={v}" for k, v in r.matched.items() if v) or ("none" if r.enabled else "disabled")
        nodes = f"{r.nodes_before}->{r.nodes_after}" if r.enabled else ""
        rows.append((r.name, r.stage, matched, nodes, f"{r.seconds:.2f}" if r.enabled else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    for r in reports:
        for w in r.warnings:
            print(f"  warning: {w}")


def _hf_reference(opt):
    """HF transformers on the same checkpoint, or None (said why) where it cannot load it here."""
    from .agreement import load_hf_reference

    try:
        return load_hf_reference(opt)
    # GPTQ / AWQ: HF needs optimum / gptqmodel / autoawq, CUDA-only packages; its weight converter
    # refuses some quantized experts (asymmetric compressed-tensors MoE, transformers 5.24): RuntimeError
    except (ImportError, RuntimeError) as e:
        print(f"\n  agreement  : skipped, HF transformers cannot load this checkpoint here ({e})")
        return None


def cmd_optimize(args) -> int:
    from .agreement import compare
    from .graph_utils import weight_bytes
    from .loading import load_tokenizer_or_none
    from .optimizer import optimize_model

    _split_overrides(args)
    opt = optimize_model(args.model, args.recipe, args.overrides, progress=not args.no_progress)
    print(f"autodeploy optimize {opt.source.name}  ({opt.device}, {str(opt.ctx.dtype).removeprefix('torch.')})")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in opt.seconds.items()))
    _print_table(opt.reports)

    report = {
        "model": opt.source.name,
        "transforms": [{"name": r.name, "enabled": r.enabled, "seconds": r.seconds, "matched": r.matched,
                        "warnings": r.warnings} for r in opt.reports],
        "check": None,
    }
    sharded = opt.recipe.parallel.tensor_parallel_size > 1
    if sharded:  # without its peers a rank's graph is a part of the model: nothing to compare
        print(f"\n  rank 0 of {opt.recipe.parallel.tensor_parallel_size} shown (every rank gets the same counts): "
              f"{weight_bytes(opt.gm) / 1e6:.1f} MB of weights as loaded (quantized, if so); "
              "check the sharded model with `autodeploy generate -tp N`")
    reference = _hf_reference(opt) if opt.source.weight_files and args.max_tokens > 0 and not sharded else None
    if reference is not None:
        tokenizer = load_tokenizer_or_none(opt.source)
        if tokenizer is None:  # a bare checkpoint: check on token ids alone
            prompt_ids, decode = list(range(1, 9)), str
        else:
            prompt_ids = _chat_prompt_ids(tokenizer, args.prompt)
            decode = lambda ids: repr(tokenizer.decode(ids, skip_special_tokens=True))  # noqa: E731
        agreement = compare(opt, reference, prompt_ids, args.max_tokens)
        print(f"\n  prompt     : {args.prompt if tokenizer else prompt_ids}")
        print(f"  HF eager   : {decode(agreement.hf_tokens)}")
        print(f"  autodeploy : {decode(agreement.ours_tokens)}")
        # Quantized while loading, the model is no longer the checkpoint HF runs: drift is expected, not a failure.
        online = any(v for r in opt.reports if r.name == "quantize_linear" for k, v in r.matched.items()
                     if k.endswith(("_linear", "_experts")))
        verdict = "identical" if agreement.tokens_equal else ("differ (quantized online)" if online else "DIFFER")
        print(f"  agreement  : greedy tokens {verdict} ({len(agreement.ours_tokens)} tokens), "
              f"max |logit diff| {agreement.max_abs_logit_diff:.2e} ({agreement.max_rel_logit_diff:.1e} of max logit)")
        report["check"] = {"tokens_equal": agreement.tokens_equal, "quantized_online": online,
                           "max_abs_logit_diff": agreement.max_abs_logit_diff,
                           "max_rel_logit_diff": agreement.max_rel_logit_diff}
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2))
        print(f"  report written to {args.report}")
    check = report["check"]
    return 0 if check is None or check["tokens_equal"] or check["quantized_online"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autodeploy", description=__doc__ and "Make any HF causal LM fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("optimize", help="export a model, run a transform recipe, check it against HF eager",
                       description="Export MODEL, run the recipe's transforms (table of what matched), then "
                                   "answer one chat prompt with the optimized graph next to HF eager.")
    _add_model_args(p)
    p.add_argument("--report", default=None, help="write the report as JSON to this path")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="chat prompt for the agreement check")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate in the check (0 skips it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_optimize)

    from .cli_bench import register as register_bench
    from .cli_eval import register as register_eval
    from .cli_generate import register as register_generate
    from .cli_serve import register as register_serve
    from .model_zoo_ci.cli import register as register_zoo

    register_generate(sub)
    register_serve(sub)
    register_bench(sub)
    register_eval(sub)
    register_zoo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may follow options (argparse alone would refuse them there).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides.extend(extra)
    try:
        return args.func(args)
    except AutoDeployError as e:
        if getattr(args, "verbose", False):
            raise
        print(f"autodeploy: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
