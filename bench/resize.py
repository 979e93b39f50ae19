"""Rank ablation by SVD energy (issue 9 item 4), measured: the built-in demo adapter resized to lower ranks (and to
per-layer ranks chosen by energy), each scored on the demo's own held-out set.

    python bench/resize.py --adapter RUN_DIR   # a finished `lorakit train` demo run (default settings)
    python bench/resize.py                     # trains the demo first (about 3 minutes on 2 cores)

Prints, per setting: the adapter's parameter count, the mean energy kept, the mean relative Frobenius error of
s·B·A and the held-out exact match and eval loss, so "how much of the rank does the task use" is read off one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LABELS = {"t": "as trained", "r": "rank {}", "e": "energy {}%"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", help="a finished demo run directory (default: train one into a temp directory)")
    p.add_argument("--ranks", default="1,2,4", help="fixed ranks to resize to")
    p.add_argument("--energies", default="0.8,0.9,0.95", help="energy targets (per-layer ranks)")
    return p.parse_args(argv)


def numbers(text: str, kind) -> list:
    return [kind(t) for t in text.split(",") if t.strip()]


def train_demo(out: Path) -> Path:
    cmd = [sys.executable, "-m", "lorakit", "train", "--threads", "1", "--out", str(out)]
    print("training the demo:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return out


def held_out(run: Path, tokenizer):
    """The run's own held-out set, split by the training loop itself from the settings in train_config.json."""
    import dataclasses

    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import _load_data

    saved = json.loads((run / "train_config.json").read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}  # older runs recorded a few more keys
    config = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    return _load_data(config, tokenizer, say=lambda *a, **k: None)[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import lorakit
    from lorakit.hf import load_base_model, load_tokenizer
    from lorakit.train.evaluate import evaluate

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.adapter) if args.adapter else train_demo(Path(tmp) / "demo")
        trained_rank = lorakit.read_adapter_config(run).r
        base_dir = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
        tokenizer = load_tokenizer(base_dir)
        eval_set = held_out(run, tokenizer)
        model = load_base_model(base_dir, "CAUSAL_LM")
        lorakit.load_adapter(model, run, adapter="trained")
        settings = [("trained", None, None)] + [(f"r{k}", k, None) for k in numbers(args.ranks, int)] + \
                   [(f"e{round(100 * e)}", None, e) for e in numbers(args.energies, float)]
        print(f"# bench/resize.py  {time.strftime('%Y-%m-%d %H:%M')}: {run}, {len(eval_set)} held-out rows, 1 thread\n")
        print("| adapter | ranks | parameters | energy kept (mean) | relative error (mean) | exact match | eval loss |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, rank, energy in settings:
            report = [] if label == "trained" else lorakit.resize_adapter(model, "trained", rank=rank, energy=energy,
                                                                          new_name=label)
            lorakit.set_active(model, label)
            with torch.random.fork_rng():
                m = evaluate(model, eval_set, "causal-lm", tokenizer.pad_token_id, tokenizer=tokenizer)
            params = sum(a.numel() for n, a in model.named_parameters() if f".adapters.{label}.lora_" in n)
            ranks = sorted({r.new_rank for r in report}) if report else [trained_rank]
            energy_kept = sum(r.energy_kept for r in report) / len(report) if report else 1.0
            error = sum(r.relative_error for r in report) / len(report) if report else 0.0
            shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            print(f"| {LABELS.get(label[0], '{}').format(label[1:])} | {shown} | {params:,} | {energy_kept:.1%} | "
                  f"{error:.3f} | {m['exact_match']:.3f} | {m['eval_loss']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
