"""`autodeploy serve`: every flag and the listening socket checked before the model loads.

Optimizing a model takes tens of seconds; a mistyped port or a port in use must not cost them. So
the flags are checked first (one line and exit code 2 each) and the socket is bound first (a port
in use is found at once); uvicorn then serves on that very socket. SIGTERM (or Ctrl-C) stops
admitting, lets in-flight requests run for --drain-timeout seconds, aborts the rest and exits.

`register(subparsers)` adds the command to the main parser (autodeploy/cli.py wires it in).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from .errors import AutoDeployError

API_KEY_ENV = "AUTODEPLOY_API_KEY"


class ServeArgumentError(AutoDeployError):
    """A bad serve flag or an address that cannot be listened on: one line, exit code 2."""


def check_flags(args) -> None:
    """Refuse out-of-range flag values before anything is loaded."""
    if not 1 <= args.port <= 65535:
        raise ServeArgumentError(f"--port {args.port}: must be in 1..65535")
    for flag in ("max_batch_size", "max_num_tokens", "max_seq_len", "max_body_bytes", "max_choices"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ServeArgumentError(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    for flag in ("drain_timeout", "max_waiting", "max_prompt_chars"):
        if getattr(args, flag) < 0:
            raise ServeArgumentError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a one-line error (unknown host, port in use, no permission)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ServeArgumentError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ServeArgumentError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def cmd_serve(args) -> int:
    """An OpenAI-compatible server (autodeploy/serve.py) until SIGTERM or Ctrl-C."""
    try:
        import uvicorn

        from .serve import ServeOptions, create_app
    except ImportError as e:
        raise ServeArgumentError(f"serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn") from None
    from .cli_generate import _load

    check_flags(args)
    sock = bind(args.host, args.port)
    llm = _load(args)
    name = args.served_model_name or llm.model.source.name
    options = ServeOptions(api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                           max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                           max_waiting=args.max_waiting, max_choices=args.max_choices)
    print(f"[autodeploy] serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(llm, name, options), log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout)
    uvicorn.Server(config).run(sockets=[sock])
    print("[autodeploy] server stopped", file=sys.stderr, flush=True)
    return 0


def _one_line_error(prog: str):
    def error(message: str):
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    return error


def register(subparsers) -> None:
    from .cli import _add_model_args
    from .cli_generate import _add_runtime_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming)",
                              description="Optimize MODEL with the recipe and serve it: POST /v1/completions and "
                                          "/v1/chat/completions (\"stream\": true for server-sent events), GET "
                                          "/v1/models, /health, /metrics, /version, POST /tokenize, /detokenize. "
                                          "Concurrent requests share the in-flight batch.")
    p.error = _one_line_error("autodeploy serve")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: the model's)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after SIGTERM before they are aborted (default 30)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond the running batch; more are answered 503 (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=2 * 2**20, help="request body bound, 413 past it (2 MiB)")
    p.add_argument("--max-prompt-chars", type=int, default=0,
                   help="prompt length bound checked before tokenizing (default 0: 16 per token of max_seq_len)")
    p.add_argument("--max-choices", type=int, default=16, help="bound on n / best_of (default 16)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_serve)
