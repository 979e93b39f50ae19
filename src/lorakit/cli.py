"""The `lorakit` command: argument parsing only; every subcommand calls a library function."""

from __future__ import annotations

import argparse
import sys

from .device import add_device_argument
from .errors import LorakitError

# Subcommands that live in their own packages, with the extra that installs what they need.
LATER_COMMANDS = (("lorakit.train.cli", "train", "train"), ("lorakit.train.generate_cli", "generate", "train"),
                  ("lorakit.serve.cli", "serve", "serve"), ("lorakit.compose.cli", "combine", "train"),
                  ("lorakit.plan.cli", "plan", "train"), ("lorakit.recommend.cli", "recommend", "train"),
                  ("lorakit.train.diagnose_cli", "diagnose", "train"))


def _inspect(args) -> int:
    from .compose.mixture import EXPERTS_DIR, is_mixture_dir
    from .errors import ConfigError
    from .inspect import inspect_adapter, inspect_mixture

    if is_mixture_dir(args.adapter):
        if args.spectrum:
            raise ConfigError(f"--spectrum takes one adapter; {args.adapter} is a saved mixture: give one of its "
                              f"experts instead ({args.adapter}/{EXPERTS_DIR}/NAME)")
        print(inspect_mixture(args.adapter, per_layer=not args.fast).format(layers=args.layers))
        return 0
    report = inspect_adapter(args.adapter, per_layer=not args.fast)
    print(report.format(layers=args.layers))
    if args.spectrum:
        from pathlib import Path

        from .compose.spectrum import format_spectrum, layer_spectra, plot_spectrum

        spectra = layer_spectra(args.adapter)
        print(format_spectrum(spectra))
        plot = args.plot or f"{Path(args.adapter).resolve().name}-spectrum.png"
        if plot_spectrum(spectra, plot, title=f"{Path(args.adapter).name}: energy kept by rank"):
            print(f"plot written to {plot}")
    return 0


def _merge(args) -> int:
    from .merge_cli import merge_to_directory

    merge_to_directory(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite, device=args.device,
                       quantize=args.quantize)
    print(f"merged model written to {args.out}")
    return 0


def _convert(args) -> int:
    from .convert import to_lora

    to_lora(args.adapter, args.out, base=args.base)
    print(f"LoRA adapter with equal outputs written to {args.out}")
    return 0


def _check(args) -> int:
    from . import convert  # noqa: F401  (registers its conversions, adalora-to-lora and pissa-to-lora)
    from .check import adapter_dirs, check, copy_as_is, fix, report
    from .errors import ConfigError

    base = None
    if args.base is not None:
        from .hf import resolve_base

        base = resolve_base(args.base)  # a wrong --base is said before any adapter is read
    paths = [p for a in args.adapters for p in adapter_dirs(a)]
    if args.fix and (args.out is None or len(paths) != 1):
        raise ConfigError("--fix writes one adapter's servable copy: pass one adapter directory and --out DIR")
    bad = 0
    for path in paths:
        adapter, found = check(path, args.engine, base=base)
        print(report(path, adapter, found, args.engine))
        if found and args.fix and adapter is not None:
            applied = fix(adapter, found, args.engine, args.out, base=args.base)
            print(f"wrote a copy that {args.engine} can serve to {args.out} ({', '.join(applied)})")
            continue
        if args.fix and adapter is not None:  # a pipeline finds a servable copy at --out either way
            copy_as_is(adapter, args.out)
            print(f"nothing to fix; copied to {args.out}")
        bad += bool(found)
    if len(paths) > 1:
        print(f"{len(paths) - bad} of {len(paths)} adapters can be served by {args.engine}")
    return 1 if bad else 0


def _demo(args) -> int:
    from .demo import run_demo

    return 0 if run_demo(steps=args.steps, device=args.device)["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA adapters: train, inspect, merge, serve.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show an adapter's rank, alpha, targets, size and effective rank",
                       description="Show an adapter's rank, alpha, targets, parameter count, file size and, per "
                                   "layer, how much of its rank the update really uses. A saved mixture of LoRAs "
                                   "shows its router settings and each expert so.")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors), or a saved "
                                   "mixture (mixture_config.json + router.safetensors + experts/)")
    p.add_argument("--layers", action="store_true", help="also list every layer")
    p.add_argument("--fast", action="store_true", help="skip the per-layer SVD")
    p.add_argument("--spectrum", action="store_true", help="each layer's share of ||ΔW||² kept at rank 1, 2, 4, ... "
                   "and a PNG plot of it")
    p.add_argument("--plot", help="where --spectrum writes its PNG (default: <adapter>-spectrum.png here)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("merge", help="fold an adapter into its base and write a plain model",
                       description="Fold an adapter into its base model and write a plain model directory "
                                   "(loads with from_pretrained, serves anywhere) in the base's own dtype.")
    p.add_argument("--base", required=True, help="base model directory, or 'builtin'")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype to load, merge and save in (default: merge in fp32, save in the base's stored dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    add_device_argument(p)
    p.add_argument("--quantize", choices=["nf4", "int8"], help="the base the adapter was trained on (QLoRA): merged "
                   "into its dequantised weights, saved in full precision")
    p.set_defaults(func=_merge)

    p = sub.add_parser("convert", help="rewrite an adapter in another method's form with equal outputs "
                                       "(AdaLoRA or PiSSA/OLoRA -> LoRA)")
    p.add_argument("adapter", help="adapter directory to convert (AdaLoRA, or PiSSA/OLoRA saved for its residual base)")
    p.add_argument("--to", required=True, choices=["lora"], help="the form to write: lora (servable by any LoRA server)")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--base", default=None, metavar="DIR", help="the model a PiSSA/OLoRA adapter was trained on (its "
                   "starting factors are recomputed from it)")
    p.set_defaults(func=_convert)


    p = sub.add_parser("check", help="whether vLLM, LoRAX, PEFT or lorakit can serve an adapter, and why not",
                       description="Checks the config and the weights' header; --fix writes a servable copy where a "
                                   "conversion exists. A directory of adapters (a registry root) checks each one.")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directory, or a directory of adapters")
    p.add_argument("--for", dest="engine", required=True, choices=["vllm", "lorax", "peft", "lorakit"])
    p.add_argument("--fix", action="store_true", help="write a copy the engine can serve (needs --out)")
    p.add_argument("--out", default=None, metavar="DIR", help="where --fix writes the copy")
    p.add_argument("--base", default=None, metavar="DIR", help="the model the adapter was trained on: its layers are "
                   "checked against this model's config (default: the adapter config's base, when that is a local "
                   "directory), and conversions that need it use it (PiSSA/OLoRA -> plain LoRA)")
    p.set_defaults(func=_check)

    p = sub.add_parser("demo", help="inject, train, save, reload and merge on a tiny built-in model")
    p.add_argument("--steps", type=int, default=60)
    add_device_argument(p)
    p.set_defaults(func=_demo)

    _add_later_commands(sub)
    return parser


def _add_later_commands(sub) -> None:
    """Subcommands from train/ and serve/. One whose module fails to import is still listed, and says why."""
    import importlib

    for module, name, extra in LATER_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            _add_unavailable(sub, name, module, extra, e)
            continue
        mod.add_parser(sub)


def _add_unavailable(sub, name: str, module: str, extra: str, error: ImportError) -> None:
    reason = f"importing {module} failed: {type(error).__name__}: {error}"
    # No option prefix: whatever the user typed after the command is taken as is, and the reason is shown.
    p = sub.add_parser(name, help=f"(unavailable: {reason})", add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs="*")

    def unavailable(args) -> int:
        raise LorakitError(f"{reason}. Install what it needs with: pip install 'lorakit[{extra}]'")

    p.set_defaults(func=unavailable)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    parts = []
    for package in ("torch", "transformers"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return f"lorakit {__version__} ({', '.join(parts)})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except LorakitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
