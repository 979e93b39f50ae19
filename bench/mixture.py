"""The mixture of LoRAs on real data (issue 9): two experts trained on two built-in tasks, then a mixture of both,
compared on a held-out set mixing both tasks with each expert alone and their fixed 50/50 combination.

    python bench/mixture.py                    # runs/mixture-study: three `lorakit train` runs, then the comparison
    python bench/mixture.py --steps 10 --quick # a short check of the whole path

Task "words": a WordNet noun → its category (the built-in demo data, wordnet_categories.jsonl).
Task "definitions": a WordNet definition → the same six categories (wordnet_glosses.jsonl, asked as a causal LM).
Each task's held-out rows are fixed up front (seeded) and never trained on; every configuration is scored on the
same mixed held-out set by generating the answer (exact match). Resumable: finished runs are not redone.
Results: OUT/results.json and a markdown table on stdout (the README quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = "Categories: animal, artifact, body, food, person, plant."
COMMON = ["--base", "builtin", "--rank", "8", "--alpha", "16", "--targets", "q_proj", "k_proj", "v_proj", "o_proj",
          "gate_proj", "up_proj", "down_proj", "--layers", *map(str, range(18, 30)), "--batch-size", "16",
          "--warmup-steps", "5", "--max-length", "96", "--seed", "0", "--threads", "1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/mixture-study")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of each expert and of the mixture")
    p.add_argument("--eval-rows", type=int, default=60, help="held-out rows per task")
    p.add_argument("--router-lr", type=float, default=5e-3)
    p.add_argument("--quick", action="store_true", help="few held-out rows: checks the path, not the result")
    args = p.parse_args(argv)
    if args.quick:
        args.eval_rows = 12
    return args


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare_data(out: Path, eval_rows: int) -> dict[str, Path]:
    from lorakit.train.builtin import DATA_DIR

    words = [json.loads(line) for line in (DATA_DIR / "wordnet_categories.jsonl").read_text().splitlines()]
    glosses = [json.loads(line) for line in (DATA_DIR / "wordnet_glosses.jsonl").read_text().splitlines()]
    definitions = [{"prompt": f"{CATEGORIES}\nDefinition: {g['text']}\nCategory:", "completion": f" {g['label']}"}
                   for g in glosses]
    files = {}
    rng = random.Random(0)
    for name, rows in (("words", words), ("definitions", definitions)):
        rows = rows[:]
        rng.shuffle(rows)
        files[f"{name}_eval"] = write_jsonl(out / "data" / f"{name}_eval.jsonl", rows[:eval_rows])
        files[f"{name}_train"] = write_jsonl(out / "data" / f"{name}_train.jsonl", rows[eval_rows:])
    mixed_train = [json.loads(x) for f in ("words_train", "definitions_train") for x in files[f].read_text().splitlines()]
    random.Random(1).shuffle(mixed_train)
    files["mixed_train"] = write_jsonl(out / "data" / "mixed_train.jsonl", mixed_train)
    files["mixed_eval"] = write_jsonl(out / "data" / "mixed_eval.jsonl", [json.loads(x) for f in ("words_eval", "definitions_eval")
                                                                         for x in files[f].read_text().splitlines()])
    return files


def train(run: Path, flags: list[str]) -> None:
    if (run / "metrics.json").exists():
        print(f"[{run.name}] done already", flush=True)
        return
    resume = ["--resume"] if (run / "checkpoints").exists() else (["--overwrite"] if run.exists() else [])
    command = [sys.executable, "-m", "lorakit", "train", *flags, "--out", str(run), "--save-every", "20", *resume]
    print(f"[{run.name}] {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def score(files: dict[str, Path], out: Path) -> dict:
    """Exact match of each configuration on the mixed held-out set and on each task's part of it."""
    import torch

    import lorakit
    from lorakit.hf import load_base_model, load_tokenizer
    from lorakit.train import data as data_mod
    from lorakit.train.builtin import default_model_dir
    from lorakit.train.evaluate import evaluate

    torch.set_num_threads(1)
    base_dir = default_model_dir()
    tokenizer = load_tokenizer(base_dir)
    sets = {name: data_mod.load_causal_lm(files[f"{name}_eval"], tokenizer, 96) for name in ("words", "definitions")}
    model = load_base_model(base_dir, "CAUSAL_LM")
    lorakit.load_mixture(model, out / "mixture", name="mixture")  # loads the experts too, as mixture's experts
    configs = {"base": None, "words expert": "words", "definitions expert": "definitions",
               "50/50 of both experts": {"words": 0.5, "definitions": 0.5}, "mixture (trained routers)": "mixture"}
    results = {}
    for label, active in configs.items():
        scores = {}
        for name, dataset in sets.items():
            if active is None:
                with lorakit.disabled(model), torch.random.fork_rng():
                    m = evaluate(model, dataset, "causal-lm", tokenizer.pad_token_id, tokenizer=tokenizer)
            else:
                lorakit.set_active(model, active)
                with torch.random.fork_rng():
                    m = evaluate(model, dataset, "causal-lm", tokenizer.pad_token_id, tokenizer=tokenizer)
            scores[name] = m["exact_match"]
        scores["mixed"] = sum(scores[n] * len(sets[n]) for n in sets) / sum(len(s) for s in sets.values())
        results[label] = scores
        print(f"  {label:28s} words {scores['words']:.3f}  definitions {scores['definitions']:.3f}  "
              f"mixed {scores['mixed']:.3f}", flush=True)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    started = time.perf_counter()
    files = prepare_data(out, args.eval_rows)
    steps = ["--max-steps", str(args.steps), "--lr", "1e-3"]
    train(out / "words", [*COMMON, *steps, "--data", str(files["words_train"]), "--eval-data", str(files["words_eval"])])
    train(out / "definitions", [*COMMON, *steps, "--data", str(files["definitions_train"]),
                                "--eval-data", str(files["definitions_eval"])])
    mixture_flags = ["--base", "builtin", "--mixture", f"words={out / 'words'}", f"definitions={out / 'definitions'}",
                     "--max-steps", str(args.steps), "--lr", str(args.router_lr), "--batch-size", "16", "--warmup-steps",
                     "5", "--max-length", "96", "--seed", "0", "--threads", "1"]
    train(out / "mixture", [*mixture_flags, "--data", str(files["mixed_train"]), "--eval-data", str(files["mixed_eval"])])
    print("scoring on the mixed held-out set ...", flush=True)
    results = score(files, out)
    (out / "results.json").write_text(json.dumps({"results": results, "steps": args.steps, "eval_rows": args.eval_rows,
                                                   "router_lr": args.router_lr}, indent=2))
    print(f"\n# bench/mixture.py  {time.strftime('%Y-%m-%d %H:%M')}: held-out exact match, {args.eval_rows} rows per task "
          f"({time.perf_counter() - started:.0f} s)\n")
    print("| configuration | words | definitions | mixed |\n| --- | --- | --- | --- |")
    for label, s in results.items():
        print(f"| {label} | {s['words']:.3f} | {s['definitions']:.3f} | {s['mixed']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
