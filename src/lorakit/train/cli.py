"""`lorakit train`: flags (or a --config file) -> TrainConfig -> train(). With no arguments: the built-in demo."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from .config import LORA_ONLY, METHODS, TrainConfig, full_refusal, read_config_file, resolve


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (no arguments: the built-in demo)",
                       description="Fine-tune a LoRA adapter. With no --base/--data/--config it trains the built-in "
                                   "pretrained model on the bundled WordNet data and compares base vs adapted.")
    d = TrainConfig()
    p.add_argument("--config", help="YAML/TOML/JSON file with any of these settings (flags override it)")
    p.add_argument("--base", help="base model directory (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="JSONL/CSV training data (default: bundled WordNet data)")
    p.add_argument("--task", choices=["causal-lm", "classify"], help=f"default {d.task}")
    p.add_argument("--out", help=f"output directory (default {d.out})")
    p.add_argument("--method", choices=METHODS, help=f"what trains: lora (an adapter) or full (every weight; OUT "
                   f"receives a full model directory) (default {d.method})")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default {d.max_steps})")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: only at the end)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: only at the end)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int)
    p.add_argument("--split-seed", type=int, help="seed of the held-out split (default: --seed)")
    p.add_argument("--rank", "-r", type=int, help=f"LoRA rank r (default {d.rank})")
    p.add_argument("--alpha", type=float, help=f"LoRA alpha (default {d.alpha:g})")
    p.add_argument("--dropout", type=float)
    p.add_argument("--targets", nargs="+", help="module names, a regex, or all-linear (default: per model family)")
    p.add_argument("--layers", type=int, nargs="+", dest="layers_to_transform", help="only these block indices")
    p.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r)")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="QLoRA: load the base in 4-bit NF4 (double quantisation) "
                   "or 8-bit through bitsandbytes; turns gradient checkpointing on")
    p.add_argument("--init", choices=["kaiming", "gaussian", "loftq"], help="adapter initialisation; loftq fits it to "
                   "the quantised base's rounding error (needs --quantize)")
    p.add_argument("--batch-size", type=int, help=f"rows per micro-batch per process (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--optim", choices=["adamw", "adamw8bit", "paged_adamw8bit"], help="optimizer (8-bit ones: "
                   "bitsandbytes; paged needs CUDA, else it falls back to adamw8bit)")
    p.add_argument("--lora-plus-ratio", type=float, help="LoRA+: learning rate of B = lr x ratio (e.g. 16)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"])
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping (0: off)")
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on with --quantize)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--packing", action="store_true", default=None, help="pack text rows into max-length blocks")
    p.add_argument("--eval-fraction", type=float)
    p.add_argument("--max-eval", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores; 1 is faster when other "
                   "jobs share the cores, since a multi-threaded op waits for its slowest thread)")
    p.add_argument("--compare-base", action="store_true", default=None, help="also evaluate the base model first")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "threads")}
    if flags.get("targets") and len(flags["targets"]) == 1:
        flags["targets"] = flags["targets"][0]  # one value: a name, a regex or "all-linear"
    if flags.get("max_grad_norm") == 0:
        flags["max_grad_norm"] = None
    file_values = read_config_file(args.config) if args.config else {}
    merged = {**file_values, **{k: v for k, v in flags.items() if v is not None}}
    full = merged.get("method") == "full"
    given = [k for k in LORA_ONLY if k in file_values or flags.get(k) is not None]
    if full and given:
        raise ConfigError(full_refusal(given))
    if merged.get("base") is None and merged.get("data") is None:
        from .builtin_run import demo_settings

        demo = demo_settings(merged.get("task", "causal-lm"))
        if full:  # the demo's adapter settings; full fine-tuning trains every layer
            demo = {k: v for k, v in demo.items() if k not in LORA_ONLY}
        file_values = {**demo, **file_values}
    elif merged.get("base") is None or merged.get("data") is None:
        missing = "--base" if merged.get("base") is None else "--data"
        raise ConfigError(f"{missing} is missing: pass both --base and --data, or neither for the built-in demo")
    return resolve(file_values, flags)


def run(args: argparse.Namespace) -> int:
    from .loop import train

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    result = train(config)
    return 1 if result.progress.stopped_reason else 0


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
