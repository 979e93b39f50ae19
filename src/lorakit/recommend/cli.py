"""`lorakit recommend`: argument parsing only; the work is `recommend_config`."""

from __future__ import annotations

from ..train.config import TASKS
from .choices import PRIORITIES


def add_parser(sub) -> None:
    p = sub.add_parser("recommend", help="starting LoRA settings for a model, task, data size and memory, with reasons",
                       description="Recommend a starting LoraConfig and lorakit train settings. Every setting comes with "
                                   "a reason citing lorakit's own study (bench/quality.py) or the memory plan, or says "
                                   "it is a prior. Nothing is loaded but the model's config.")
    p.add_argument("--model", required=True, help="model directory, its config.json, or 'builtin'")
    p.add_argument("--task", default="causal-lm", choices=TASKS)
    p.add_argument("--examples", type=int, help="rows of training data")
    p.add_argument("--memory-gb", type=float, help="GiB of GPU memory (of RAM with --device cpu) to fit in")
    p.add_argument("--priority", default="quality", choices=PRIORITIES)
    p.add_argument("--seq", type=int, default=512, help="tokens per row (the plan's and lorakit train's --max-length)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="where training will run (default: cuda if visible here)")
    p.add_argument("--data", help="the training data (JSONL/CSV): put into the command and --write's file; its rows "
                                  "are --examples when that is not given")
    p.add_argument("--write", metavar="FILE", help="also write the settings as a lorakit train --config file "
                                                   "(.yaml, .yml or .json)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .recommender import recommend_config

    torch.set_num_threads(1)  # planning is a little arithmetic on a meta-device model
    examples = args.examples if args.examples is not None or not args.data else count_rows(args.data)
    rec = recommend_config(args.model, task=args.task, examples=examples, memory_gb=args.memory_gb,
                           priority=args.priority, seq=args.seq, device=args.device)
    print(rec.format(data=args.data))
    if args.write:
        path = rec.write(args.write, data=args.data)
        needs_data = not rec.bundled and not args.data
        print(f"wrote {path}: lorakit train --config {path}" + (" --data DATA.jsonl" if needs_data else ""))
    return 0


def count_rows(path: str) -> int:
    """Non-empty lines of a JSONL file, or data rows of a CSV file (its header excluded)."""
    from pathlib import Path

    from ..errors import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--data {path!r} does not exist; pass the training data file, or --examples N")
    with open(file, encoding="utf-8") as f:
        rows = sum(1 for line in f if line.strip())
    return rows - 1 if file.suffix == ".csv" else rows
