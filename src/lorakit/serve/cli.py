"""`lorakit serve`: argument parsing for the OpenAI-compatible server; the work is in server.py."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..device import add_device_argument, add_threads_argument


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
                       description="Each adapter is a model name of its own; requests for different adapters share "
                                   "batches. /v1/chat/completions puts messages through the tokenizer's chat template "
                                   "(as `lorakit train` does for 'messages' rows and --chat-template); /v1/completions "
                                   "takes the prompt as plain text. vLLM's flag names work too.")
    p.add_argument("--base", "--model", dest="base", required=True,
                   help="base model directory (with its tokenizer), or 'builtin'")
    p.add_argument("--adapters", "--lora-modules", dest="adapters", nargs="*", default=[], metavar="NAME=PATH",
                   help='adapters to serve, e.g. chat=out/chat (vLLM\'s JSON form {"name": ..., "path": ...} too)')
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="every adapter must lie inside DIR; POST /v1/adapters may load from it (off without it)")
    p.add_argument("--register-all", action="store_true",
                   help="register every adapter directory under --adapter-root by its relative path (broken ones are "
                        "skipped and listed, with the reason, at start and by GET /v1/adapters)")
    p.add_argument("--prefill-tokens", type=int, default=128,
                   help="tokens per prefill forward at most: waiting prompts are prefilled together, long ones in "
                        "chunks (default: %(default)s)")
    p.add_argument("--name", "--served-model-name", dest="name", default=None,
                   help="model name of the base (default: the last part of --base)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY; none if unset)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together at most (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429 (default: %(default)s)")
    p.add_argument("--max-loaded", "--max-loras", dest="max_loaded", type=int, default=None,
                   help="adapters kept loaded at most (LRU eviction)")
    p.add_argument("--max-lora-rank", type=int, default=None, help="refuse adapters of a higher rank")
    p.add_argument("--enable-lora", action="store_true", help="accepted for vLLM's command lines; LoRA is always on")
    p.add_argument("--max-adapter-mb", type=float, default=None, help="memory for loaded adapters at most, in MiB")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="dtype to load the base in")
    add_threads_argument(p, "torch threads for the engine (default: torch's choice; 1 is often faster on a busy "
                            "small CPU)")
    add_device_argument(p)
    p.set_defaults(func=run_serve)


def parse_adapters(items: list[str]) -> dict[str, str]:
    from ..errors import ConfigError

    adapters: dict[str, str] = {}
    for item in items:
        if item.lstrip().startswith("{"):  # vLLM: --lora-modules '{"name": "sql", "path": "/adapters/sql"}'
            try:
                spec = json.loads(item)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--adapters: {item!r} is not valid JSON ({e.msg})") from None
            name, sep, path = spec.get("name"), "=", spec.get("path")
        else:
            name, sep, path = item.partition("=")
        if not sep or not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ConfigError(f"--adapters takes NAME=PATH pairs (or {{\"name\": ..., \"path\": ...}}), got {item!r}")
        if name in adapters:
            raise ConfigError(f"--adapters names {name!r} twice")
        adapters[name] = path
    return adapters


def run_serve(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..hf import resolve_base

    device = resolve_device(args.device)  # before the server or the model loads, as the base's check
    base = resolve_base(args.base, tokenizer=True)
    import torch
    import uvicorn

    from .server import create_app

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    max_bytes = int(args.max_adapter_mb * 2**20) if args.max_adapter_mb is not None else None
    name = args.name or os.path.basename(os.path.normpath(args.base))  # as vLLM: the name --base was given by
    app = create_app(base, adapters=parse_adapters(args.adapters), adapter_root=args.adapter_root,
                     api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue, base_name=name,
                     dtype=args.dtype, max_loaded=args.max_loaded, max_bytes=max_bytes, max_lora_rank=args.max_lora_rank,
                     register_root=args.register_all, prefill_tokens=args.prefill_tokens, device=device)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lorakit serve: warning: listening on {args.host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
