"""`lorakit train`: flags (or a --config file) -> TrainConfig -> train(). With no arguments: the built-in demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..device import add_device_argument, add_threads_argument
from ..errors import ConfigError
from ..hf import BUILTIN
from .config import LORA_ONLY, METHOD_DEFAULTS, METHODS, TrainConfig, full_refusal, read_config_file, resolve


def add_parser(sub) -> None:
    from ..hf import BUILTIN
    from .builtin import model_path

    p = sub.add_parser("train", help="fine-tune a LoRA adapter (no arguments: the built-in demo)",
                       description="Fine-tune a LoRA adapter. With no --base/--data/--config it trains the built-in "
                                   "pretrained model on the bundled WordNet data and compares base vs adapted. "
                                   "Data rows: 'messages' (chat template, loss on assistant turns), 'prompt'/'completion' "
                                   "or 'instruction'/'output' (loss on the completion), 'text'; 'text'/'label' to classify.")
    d = TrainConfig()
    p.add_argument("--config", help="YAML/TOML/JSON file with any of these settings (flags override it)")
    p.add_argument("--base", help=f"base model directory, or '{BUILTIN}' (the default): SmolLM2-135M-Instruct, "
                   f"converted once into {model_path()}")
    p.add_argument("--data", help="JSONL/CSV training data (default: bundled WordNet data)")
    p.add_argument("--eval-data", help="held-out JSONL/CSV data (default: hold out --eval-fraction of --data)")
    p.add_argument("--task", choices=["causal-lm", "classify"], help=f"default {d.task}")
    p.add_argument("--out", "--output-dir", dest="out", help=f"output directory (default {d.out})")
    p.add_argument("--method", choices=METHODS, help=f"what trains: lora (an adapter), dora (a DoRA adapter), adalora "
                   f"(an adapter whose rank budget moves to the layers that need it: 1.5x --rank pruned to --rank on "
                   f"average), vera (a VeRA adapter: --rank defaults to 256, --lr to 3e-2), full (every weight; OUT "
                   f"receives a full model directory) or mixture (routers over --mixture experts) "
                   f"(default {d.method})")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default {d.max_steps})")
    p.add_argument("--epochs", "--num-train-epochs", dest="epochs", type=float,
                   help="passes over the training rows (sets --max-steps)")
    p.add_argument("--save-every", "--save-steps", dest="save_every", type=int,
                   help="checkpoint every N steps (default: only at the end)")
    p.add_argument("--eval-every", "--eval-steps", dest="eval_every", type=int,
                   help="evaluate every N steps (default: only at the end)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace the run already in --out")
    p.add_argument("--seed", type=int)
    p.add_argument("--split-seed", type=int, help="seed of the held-out split (default: --seed)")
    p.add_argument("--rank", "-r", "--lora-r", dest="rank", type=int, help=f"LoRA rank r (default {d.rank})")
    p.add_argument("--alpha", "--lora-alpha", dest="alpha", type=float, help=f"LoRA alpha (default {d.alpha:g})")
    p.add_argument("--dropout", "--lora-dropout", dest="dropout", type=float)
    p.add_argument("--targets", "--lora-target-modules", dest="targets", nargs="+",
                   help="module names, a regex, or all-linear (default: per model family); a name that matches "
                        "nothing is an error")
    p.add_argument("--layers", type=int, nargs="+", dest="layers_to_transform", help="only these block indices")
    p.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r)")
    p.add_argument("--mixture", nargs="+", metavar="NAME=DIR", help="train a mixture of these frozen expert adapters: "
                   "only a per-layer router that weights them per token trains (X-LoRA / MoLE style)")
    p.add_argument("--top-k", type=int, help="mixture: route each token to its k best experts (default: all, weighted)")
    p.add_argument("--load-balance", type=float, help="mixture: weight of the load-balancing loss (default 0.01)")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="QLoRA: load the base in 4-bit NF4 (double quantisation) "
                   "or 8-bit through bitsandbytes; turns gradient checkpointing on")
    p.add_argument("--init", help="how A and B start: kaiming (default; B = 0), gaussian, pissa, pissa_niter_N (randomised "
                   "SVD), olora (pissa/olora start from the base's principal directions, the base keeps the residual), "
                   "loftq (fitted to the quantised base's rounding error; needs --quantize). --method dora: kaiming or "
                   "gaussian; adalora, vera: kaiming only")
    p.add_argument("--batch-size", "--per-device-train-batch-size", dest="batch_size", type=int,
                   help=f"rows per micro-batch per process (default {d.batch_size})")
    p.add_argument("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=int,
                   help="micro-batches per optimizer step")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--optim", choices=["adamw", "adamw8bit", "paged_adamw8bit"], help="optimizer (8-bit ones: "
                   "bitsandbytes; paged needs CUDA, else it falls back to adamw8bit)")
    p.add_argument("--lora-plus-ratio", type=float, help="LoRA+: learning rate of B = lr x ratio (e.g. 16)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", "--lr-scheduler-type", dest="schedule", choices=["linear", "cosine", "constant"])
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping (0: off)")
    p.add_argument("--precision", choices=["fp32", "bf16"])
    add_device_argument(p, default=None)  # None: the config file's (or a resumed run's), else auto
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on with --quantize)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--packing", action="store_true", default=None, help="pack text rows into max-length blocks")
    p.add_argument("--chat-template", action="store_true", default=None,
                   help="put prompt/completion rows through the tokenizer's chat template too, as "
                        "/v1/chat/completions and `lorakit generate --chat` will ask ('messages' rows always are)")
    p.add_argument("--skip-bad-rows", action="store_true", default=None,
                   help="train on the good rows when some are malformed (default: stop and list them)")
    p.add_argument("--eval-fraction", type=float)
    p.add_argument("--max-eval", type=int)
    add_threads_argument(p, "torch CPU threads (default: all cores; 1 is faster when other jobs share the cores, "
                            "since a multi-threaded op waits for its slowest thread)")
    p.add_argument("--compare-base", action="store_true", default=None, help="also evaluate the base model first")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "threads")}
    if flags.get("targets") and len(flags["targets"]) == 1:
        flags["targets"] = flags["targets"][0]  # one value: a name, a regex or "all-linear"
    if flags.get("mixture"):
        flags["mixture"] = parse_experts(flags["mixture"])
    if flags.get("max_grad_norm") == 0:
        flags["max_grad_norm"] = None
    if flags.get("epochs") is not None and flags.get("max_steps") is not None:
        raise ConfigError("--epochs and --max-steps both set the length of the run; pass one of them")
    file_values = read_config_file(args.config) if args.config else {}
    run_config = Path(flags.get("out") or TrainConfig.out) / "train_config.json"
    if flags.get("resume") and not args.config and run_config.exists():
        file_values = read_config_file(run_config)  # --resume continues the run as it was set up
    for given, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
        if flags.get(given) is not None:  # a flag wins over the file's way of saying how long to train
            file_values.pop(other, None)
    merged = {**file_values, **{k: v for k, v in flags.items() if v is not None}}
    full = merged.get("method") == "full"
    method_defaults = METHOD_DEFAULTS.get(merged.get("method"), {})
    given = [k for k in LORA_ONLY if k in file_values or flags.get(k) is not None]
    if full and given:
        raise ConfigError(full_refusal(given))
    if merged.get("base") in (None, BUILTIN) and merged.get("data") is None:
        from .builtin_run import demo_settings

        demo = demo_settings(merged.get("task", "causal-lm"))
        if full:  # the demo's adapter settings; full fine-tuning trains every layer
            demo = {k: v for k, v in demo.items() if k not in LORA_ONLY}
        file_values = {**demo, **method_defaults, **file_values}
    elif merged.get("data") is None:
        raise ConfigError("--data is missing: pass the training data (JSONL/CSV), or neither --base nor --data "
                          "for the built-in demo")
    else:
        file_values = {**method_defaults, **file_values}
    return resolve(file_values, flags)


def parse_experts(items: list[str]) -> dict[str, str]:
    experts = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ConfigError(f"--mixture {item!r}: write each expert as NAME=DIR, e.g. words=runs/words")
        if name in experts:
            raise ConfigError(f"--mixture names expert {name!r} twice")
        experts[name] = path
    return experts


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
