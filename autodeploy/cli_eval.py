"""`autodeploy eval-ppl`: perplexity of a text file through the optimized model.

`register(subparsers)` adds the command to the main parser (autodeploy/cli.py wires it in).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import AutoDeployError


class EvalArgumentError(AutoDeployError):
    """A bad evaluation input (missing text, no tokenizer, bad window): one line, exit code 2."""


def cmd_eval_ppl(args) -> int:
    from .cli import _split_overrides, check_at_least, print_warnings
    from .eval.perplexity import PerplexityInputError, model_perplexity, text_token_ids
    from .loading import load_tokenizer_or_none
    from .optimizer import optimize_model

    _split_overrides(args)
    # checked before the model builds; 0 is not "the default"
    check_at_least(EvalArgumentError, {"--window": (args.window, 2), "--stride": (args.stride, 1)})
    if not Path(args.text).is_file():
        raise EvalArgumentError(f"--text {args.text}: no such file")
    opt = optimize_model(args.model, args.recipe, args.overrides, progress=False)
    print_warnings(opt.reports)
    tokenizer = load_tokenizer_or_none(opt.source)
    if tokenizer is None:
        raise EvalArgumentError(f"{opt.source.name} has no tokenizer: a text cannot be scored")
    ids = text_token_ids(tokenizer, args.text)
    try:
        result = model_perplexity(opt, ids, args.window, args.stride)
    except PerplexityInputError as e:
        raise EvalArgumentError(str(e)) from None
    quant = opt.recipe.quantization
    report = {"model": opt.source.name, "text": str(args.text), "device": str(opt.device),
              "dtype": str(opt.ctx.dtype).removeprefix("torch."), "overrides": list(args.overrides),
              "quantization": quant.algo, "group_size": quant.nominal_group_size, "kv_cache_dtype": quant.kv_cache_dtype,
              "build_s": opt.seconds, **result.as_dict()}
    print(f"autodeploy eval-ppl {opt.source.name}  ({report['device']}, {report['dtype']}, quantization "
          f"{quant.algo}, kv cache {quant.kv_cache_dtype})")
    print(f"  {args.text}: {result.tokens} tokens scored in {result.windows} windows of {result.window} "
          f"(stride {result.stride}): perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.4f} nats)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def register(subparsers) -> None:
    """Add `eval-ppl` to autodeploy's subcommands."""
    from .cli import _add_model_args

    p = subparsers.add_parser(
        "eval-ppl", help="perplexity of a text file through the optimized model",
        description="Optimize MODEL (recipe, overrides and quantization as for optimize), then score a text "
                    "file: windows of --window tokens every --stride tokens, each token scored once.")
    _add_model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to score (e.g. tests/data/shakespeare_coriolanus.txt)")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per forward (default: the model's context, at most the recipe's export.max_seq_len)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --window)")
    p.add_argument("--json", default=None, help="write the result as JSON to this path")
    p.set_defaults(func=cmd_eval_ppl)
