"""`autodeploy generate` and `autodeploy chat`: the runtime from the command line (serve: cli_serve.py).

`register(subparsers)` adds the commands to the main parser (autodeploy/cli.py wires it in).
"""

from __future__ import annotations

import argparse
import sys


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 is off")
    g.add_argument("--seed", type=int, default=None, help="per-request seed: same seed, same text")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    _add_runtime_args(p)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Keywords of LLM(...) that override the recipe's runtime section."""
    r = p.add_argument_group("runtime")
    r.add_argument("--max-batch-size", type=int, default=None, help="sequences in flight at once")
    r.add_argument("--max-num-tokens", type=int, default=None, help="tokens per forward pass")
    r.add_argument("--max-seq-len", type=int, default=None, help="prompt + output tokens per request")
    add_prefix_caching_arg(r)


def add_prefix_caching_arg(group) -> None:
    group.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                       help="recompute every prompt in full (default: reuse the KV blocks of prefixes seen before)")


def _sampling_params(args):
    from .llm import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _load(args):
    from .cli import _split_overrides, print_warnings
    from .llm import LLM

    _split_overrides(args)
    runtime = {k: getattr(args, k) for k in ("max_batch_size", "max_num_tokens", "max_seq_len", "enable_prefix_caching")
               if getattr(args, k) is not None}
    print(f"[autodeploy] optimizing {args.model or 'the default model'} ...", file=sys.stderr, flush=True)
    llm = LLM(args.model, args.recipe, overrides=args.overrides, **runtime)
    print_warnings(llm.model.reports)
    return llm


def cmd_generate(args) -> int:
    from .llm import chat_prompt_ids

    params = _sampling_params(args)  # bad flags fail before the model loads
    llm = _load(args)
    prompts = [chat_prompt_ids(llm.tokenizer, [{"role": "user", "content": p}]) if args.chat else p
               for p in args.prompt]
    if len(prompts) == 1:  # one prompt: stream it
        for out in llm.stream(prompts[0], params):
            print(out.delta_text, end="", flush=True)
        print()
        outs = [out]
    else:
        outs = llm.generate(prompts, params)
        for text, out in zip(args.prompt, outs):
            print(f"### {text}\n{out.text}\n")
    failed = 0
    for text, out in zip(args.prompt, outs):
        if out.finish_reason == "error":
            print(f"autodeploy: error: prompt {text[:40]!r}: {out.error}", file=sys.stderr)
            failed += 1
        else:
            print(f"[{len(out.token_ids)} tokens, finish: {out.finish_reason}]", file=sys.stderr)
    return 1 if failed else 0


def cmd_chat(args) -> int:
    """A conversation on stdin/stdout; works piped as well as on a terminal."""
    from .llm import chat_prompt_ids

    params = _sampling_params(args)
    llm = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /exit to quit, /reset to forget the conversation", file=sys.stderr)
    history = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = None
        for out in llm.stream(chat_prompt_ids(llm.tokenizer, history), params):
            print(out.delta_text, end="", flush=True)
            reply = out
        print(flush=True)
        if reply.finish_reason == "error":
            print(f"autodeploy: error: {reply.error}", file=sys.stderr)
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply.text})


def register(subparsers) -> None:
    """Add `generate` and `chat` to autodeploy's subcommands."""
    from .cli import _add_model_args

    p = subparsers.add_parser("generate", help="generate text for one or more prompts (batched, streamed)",
                              description="Optimize MODEL with the recipe, then complete each --prompt. "
                                          "One prompt streams; several run as one in-flight batch.")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    _add_sampling_args(p, max_tokens=64)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("chat", help="interactive chat through the model's chat template",
                              description="Chat with MODEL: one user turn per line on stdin, the reply streams. "
                                          "/exit (or end of input) quits, /reset forgets the conversation.")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(p, max_tokens=256)
    p.set_defaults(func=cmd_chat)
