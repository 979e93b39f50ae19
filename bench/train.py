"""Training throughput and peak memory: `lorakit train` vs PEFT + a plain PyTorch loop, same model and data.

Each side runs in its own process so peak RSS is its own. Prints tokens/s, peak memory and ratios.
    python bench/train.py            # Llama hidden 512, 8 layers, vocab 8000, 48 steps of 8 x ~128 tokens
    python bench/train.py --quick    # a smaller model, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "full": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=8000),
    "quick": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=2000),
}


def make_assets(root: Path, size: str) -> tuple[Path, Path]:
    """A config-built Llama with a word-level tokenizer, and prompt/completion rows of random words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = SIZES[size]
    words = [f"w{i}" for i in range(cfg["vocab_size"] - 4)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    base = root / "base"
    model.save_pretrained(base)
    fast.save_pretrained(base)
    rng = random.Random(0)
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for _ in range(600):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(48, 80)))
            completion = " " + " ".join(rng.choice(words) for _ in range(rng.randint(48, 80)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return base, data


def run_lorakit(base: Path, data: Path, steps: int, out: Path) -> dict:
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    cfg = TrainConfig(base=str(base), data=str(data), out=str(out), max_steps=steps, batch_size=8, lr=1e-4,
                      rank=16, alpha=32, targets="all-linear", eval_fraction=0.02, max_eval=8, exact_match=False,
                      max_length=256)
    result = train(cfg)
    p = result.progress
    return {"tokens": p.tokens, "seconds": p.train_seconds}


def run_peft(base: Path, data: Path, steps: int, out: Path) -> dict:
    """The loop people write with PEFT: get_peft_model, model(**batch, labels=...), AdamW, clipping."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorakit.hf import load_base_model, load_tokenizer
    from lorakit.train import data as D

    torch.manual_seed(0)
    tok = load_tokenizer(base)
    ds = D.load_causal_lm(data, tok, 256)
    model = get_peft_model(load_base_model(base, "CAUSAL_LM"),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    order = D.epoch_order(len(ds), 0, 0)
    tokens, seconds = 0, 0.0
    for step in range(steps):
        rows = [ds.examples[i] for i in order[(step * 8) % (len(ds) - 8):][:8]]
        t0 = time.perf_counter()
        batch = D.collate(rows, tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum())
    return {"tokens": tokens, "seconds": seconds}


def child(which: str, root: Path, steps: int) -> None:
    import torch

    torch.set_num_threads(int(_arg("--threads", "2")))
    fn = run_lorakit if which == "lorakit" else run_peft
    res = fn(root / "base", root / "data.jsonl", steps, root / f"out-{which}-{time.time_ns()}")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def _arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="alternate lorakit/PEFT runs this many times; report medians")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["lorakit", "peft"])
    ap.add_argument("--root")
    args = ap.parse_args()
    steps = args.steps or (8 if args.quick else 48)
    if args.child:
        child(args.child, Path(args.root), steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_assets(root, "quick" if args.quick else "full")
        results: dict[str, list[dict]] = {"lorakit": [], "peft": []}
        for r in range(args.rounds):
            for which in ("lorakit", "peft") if r % 2 == 0 else ("peft", "lorakit"):
                cmd = [sys.executable, __file__, "--child", which, "--root", str(root), "--steps", str(steps),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[which].append(json.loads(out.split("RESULT ", 1)[1]))
                print(f"round {r + 1}: {which} done", file=sys.stderr)
    table = {}
    for which, runs in results.items():
        tps = sorted(x["tokens"] / x["seconds"] for x in runs)[len(runs) // 2]
        rss = sorted(x["peak_rss_mb"] for x in runs)[len(runs) // 2]
        table[which] = (tps, rss)
    (lk_tps, lk_rss), (pf_tps, pf_rss) = table["lorakit"], table["peft"]
    print(f"\ntraining, {'quick' if args.quick else 'Llama h512 x 8 layers'}, all-linear r=16, batch 8, {steps} steps, "
          f"{args.threads} threads, median of {args.rounds}")
    print(f"{'':18}{'tokens/s':>10}{'peak RSS MB':>13}")
    print(f"{'lorakit train':18}{lk_tps:>10.0f}{lk_rss:>13.0f}")
    print(f"{'PEFT + plain loop':18}{pf_tps:>10.0f}{pf_rss:>13.0f}")
    print(f"{'ratio':18}{lk_tps / pf_tps:>9.2f}x{lk_rss / pf_rss:>12.2f}x   "
          f"(target: faster > 1.00x, smaller < 1.00x) -> {'met' if lk_tps > pf_tps and lk_rss < pf_rss else 'NOT met'}")


if __name__ == "__main__":
    main()
