"""`lorakit combine`, `lorakit resize` and `lorakit extract`: argument parsing only."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("combine", help="combine adapters into a new one (linear, cat, svd, ties, dare, magnitude_prune)",
                       description="Combine adapters into a new PEFT-format adapter. Without --base the adapters' files "
                                   "are combined directly (plain LoRA); with --base they are loaded onto it first.")
    p.add_argument("adapters", nargs="+", metavar="NAME=DIR[:WEIGHT]", help="each adapter and its weight (default 1)")
    p.add_argument("--method", default="svd", help="cat, svd, linear, ties, dare_linear, dare_ties, magnitude_prune, "
                   "or <ties|dare_linear|dare_ties|magnitude_prune>_svd (default svd)")
    p.add_argument("--density", type=float, help="share of entries kept by ties/dare/magnitude_prune, in (0, 1]")
    p.add_argument("--rank", type=int, help="rank of the svd methods (default: the largest rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random (dare) methods")
    p.add_argument("--majority-sign", default="total", choices=["total", "frequency"])
    p.add_argument("--base", help="base model directory (needed for VeRA/AdaLoRA/PiSSA adapters)")
    p.add_argument("--out", required=True, help="directory for the combined adapter")
    p.set_defaults(func=_combine)

    p = sub.add_parser("resize", help="re-factorise an adapter at a lower rank (SVD), reporting what each layer keeps")
    p.add_argument("adapter", help="adapter directory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="the new rank of every layer")
    group.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share of ‖ΔW‖² (e.g. 0.9)")
    p.add_argument("--out", required=True, help="directory for the resized adapter")
    p.set_defaults(func=_resize)

    p = sub.add_parser("extract", help="turn a full fine-tune into a LoRA adapter (truncated SVD of W_tuned - W_base)")
    p.add_argument("--base", required=True, help="the base model directory")
    p.add_argument("--tuned", required=True, help="the fully fine-tuned model directory (same architecture)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--targets", nargs="+", default=["all-linear"], help="module names, a regex, or all-linear (default)")
    p.add_argument("--out", required=True, help="directory for the adapter")
    p.set_defaults(func=_extract)


def parse_sources(items: list[str]) -> list[tuple[str, str, float]]:
    """NAME=DIR[:WEIGHT] → (name, dir, weight); a directory may itself contain ':'."""
    sources = []
    for item in items:
        name, eq, rest = item.partition("=")
        if not eq or not name or not rest:
            raise ConfigError(f"{item!r}: write each adapter as NAME=DIR or NAME=DIR:WEIGHT, e.g. code=runs/code:0.6")
        path, colon, weight = rest.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            path, value = rest, 1.0  # no weight given (or the ':' belongs to the path)
        if not colon:
            path, value = rest, 1.0
        sources.append((name, path, value))
    return sources


def _combine(args: argparse.Namespace) -> int:
    sources = parse_sources(args.adapters)
    if args.base is None:
        from .combine import combine_adapter_files

        combine_adapter_files([(d, w) for _, d, w in sources], args.out, args.method, args.density, args.rank,
                              args.seed, args.majority_sign)
    else:
        from .. import load_adapter, read_adapter_config, save_adapter
        from ..hf import load_base_model
        from .combine import combine_adapters

        model = load_base_model(args.base, read_adapter_config(sources[0][1]).task_type)
        for name, path, _ in sources:
            load_adapter(model, path, adapter=name, activate=False)
        combine_adapters(model, {n: w for n, _, w in sources}, args.method, "combined", args.density, args.rank,
                         args.seed, args.majority_sign)
        save_adapter(model, args.out, adapter="combined")
    print(f"combined adapter ({args.method}) written to {args.out}")
    return 0


def _resize(args: argparse.Namespace) -> int:
    from .resize import resize_adapter_files

    for row in resize_adapter_files(args.adapter, args.out, rank=args.rank, energy=args.energy):
        print(row.format())
    print(f"resized adapter written to {args.out}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from .extract import extract_adapter

    targets = args.targets[0] if len(args.targets) == 1 else args.targets
    print(extract_adapter(args.base, args.tuned, args.rank, args.out, targets=targets).format())
    return 0
