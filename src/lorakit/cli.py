"""The `lorakit` command: argument parsing only; every subcommand calls a library function."""

from __future__ import annotations

import argparse
import sys


def _inspect(args) -> int:
    from .inspect import inspect_adapter

    report = inspect_adapter(args.adapter, per_layer=not args.fast)
    print(report.format())
    if args.layers:
        for lr in report.layers:
            print(f"  {lr.module:60s} r={lr.rank:<4d} effective={lr.effective_rank:<4d} |ΔW|={lr.norm:.4g}")
    return 0


def _merge(args) -> int:
    from .merge_cli import merge_to_directory

    merge_to_directory(args.base, args.adapter, args.out, dtype=args.dtype)
    print(f"merged model written to {args.out}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(steps=args.steps)
    return 0 if result["reload_max_diff"] < 1e-5 and result["merged_max_diff"] < 1e-4 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA adapters: train, inspect, merge, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show an adapter's rank, alpha, targets, size and effective rank")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--layers", action="store_true", help="also list every layer")
    p.add_argument("--fast", action="store_true", help="skip the per-layer SVD")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("merge", help="fold an adapter into its base and write a plain model")
    p.add_argument("--base", required=True, help="base model directory")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="dtype to load and save in")
    p.set_defaults(func=_merge)

    p = sub.add_parser("demo", help="inject, train, save, reload and merge on a tiny built-in model")
    p.add_argument("--steps", type=int, default=60)
    p.set_defaults(func=_demo)

    _add_later_commands(sub)
    return parser


def _add_later_commands(sub) -> None:
    """Subcommands that live in their own packages (train/, serve/), registered if importable."""
    import importlib

    for module, name in (("lorakit.train.cli", "train"), ("lorakit.train.generate_cli", "generate"), ("lorakit.serve.cli", "serve"),
                         ("lorakit.train.diagnose_cli", "diagnose")):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        mod.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    from .errors import LorakitError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except LorakitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
