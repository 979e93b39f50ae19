"""`lorakit serve`: argument parsing for the OpenAI-compatible server; the work is in server.py."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
                       description="Each adapter is a model name of its own; requests for different adapters share batches.")
    p.add_argument("--base", required=True, help="base model directory (with its tokenizer)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME=PATH", help="adapters to serve, e.g. chat=out/chat")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="every adapter must lie inside DIR; POST /v1/adapters may load from it (off without it)")
    p.add_argument("--register-all", action="store_true",
                   help="register every adapter directory under --adapter-root by its relative path (broken ones are "
                        "skipped and listed, with the reason, at start and by GET /v1/adapters)")
    p.add_argument("--prefill-tokens", type=int, default=128,
                   help="tokens per prefill forward at most: waiting prompts are prefilled together, long ones in chunks")
    p.add_argument("--name", default=None, help="model name of the base (default: its directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY; none if unset)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    p.add_argument("--max-loaded", type=int, default=None, help="adapters kept loaded at most (LRU eviction)")
    p.add_argument("--max-adapter-mb", type=float, default=None, help="memory for loaded adapters at most, in MiB")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="dtype to load the base in")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the engine (default: torch's choice; 1 is often faster on a busy small CPU)")
    p.set_defaults(func=run_serve)


def parse_adapters(items: list[str]) -> dict[str, str]:
    from ..errors import ConfigError

    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapters takes NAME=PATH pairs, got {item!r}")
        if name in adapters:
            raise ConfigError(f"--adapters names {name!r} twice")
        adapters[name] = path
    return adapters


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from .server import create_app

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    max_bytes = int(args.max_adapter_mb * 2**20) if args.max_adapter_mb is not None else None
    app = create_app(args.base, adapters=parse_adapters(args.adapters), adapter_root=args.adapter_root,
                     api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue, base_name=args.name,
                     dtype=args.dtype, max_loaded=args.max_loaded, max_bytes=max_bytes, register_root=args.register_all,
                     prefill_tokens=args.prefill_tokens)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lorakit serve: warning: listening on {args.host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
