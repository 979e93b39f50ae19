"""Variants benchmark (issue 7): per method, trainable parameters, the training step against lorakit's plain
LoRA step and against PEFT's same method, and the unmerged forward against the base, in one run.

    python bench/variants.py            # Llama hidden 512, 4 layers, vocab 8000, batch 4 x 256, all 7 projections
    python bench/variants.py --quick    # a tiny model: checks the script runs
    python bench/variants.py --methods lora,dora

All steps run interleaved (A B C ..., then reversed), one torch thread; ratios are medians over rounds of
neighbouring runs (see bench/core.py), so noise on a shared machine falls on every method alike.
Adding a method is one entry in METHODS.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakit  # noqa: E402
from core import fmt_time, interleaved, median, paired_ratio  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Method:
    """How to put one method on a model with lorakit and with PEFT, and what runs after each optimizer step."""

    ours: Callable[[], object]  # a lorakit config
    peft: Callable[[], object] | None  # a PEFT config (None: PEFT has no such method)
    after_step_ours: Callable[[torch.nn.Module, int], None] | None = None
    after_step_peft: Callable[[torch.nn.Module, int], None] | None = None
    extra_loss_ours: Callable[[torch.nn.Module], torch.Tensor] | None = None  # PEFT adds its own inside forward


def _peft_lora(**kw):
    from peft import LoraConfig

    return LoraConfig(target_modules=TARGETS, **kw)


def _peft_vera(**kw):
    from peft import VeraConfig

    return VeraConfig(target_modules=TARGETS, **kw)


def _peft_adalora(**kw):
    from peft import AdaLoraConfig

    # task_type: PEFT adds the orthogonality regulariser in the forward of its task models only
    return AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **kw)


# AdaLoRA: every timed step is in the budget phase (tinit 0, total_step far away, delta_t 1), the costliest one:
# importance update and pruning after every step, the regulariser in every loss.
ADALORA = dict(init_r=12, target_r=8, total_step=10_000)

METHODS: dict[str, Method] = {
    "lora": Method(lambda: lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS),
                   lambda: _peft_lora(r=16, lora_alpha=32)),
    "dora": Method(lambda: lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS, use_dora=True),
                   lambda: _peft_lora(r=16, lora_alpha=32, use_dora=True)),
    "adalora": Method(lambda: lorakit.AdaLoraConfig(alpha=32, target_modules=TARGETS, **ADALORA),
                      lambda: _peft_adalora(lora_alpha=32, **ADALORA),
                      after_step_ours=lorakit.adalora_step,
                      after_step_peft=lambda m, step: m.base_model.update_and_allocate(step),
                      extra_loss_ours=lorakit.adalora_orth_loss),
    "vera": Method(lambda: lorakit.VeraConfig(r=256, target_modules=TARGETS), lambda: _peft_vera(r=256)),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=4, help="timed rounds (after one warm-up)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab, args.batch, args.seq, args.reps = 64, 2, 128, 500, 2, 32, 2
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    return args


def build(args):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False)
    base = LlamaForCausalLM(config).requires_grad_(False).eval()
    floor = copy.deepcopy(base)
    floor.enable_input_require_grads()
    models = {}
    for name in args.methods:
        m = METHODS[name]
        ours = copy.deepcopy(base)
        lorakit.inject(ours, m.ours())
        models[f"{name} lorakit"] = (ours, m.after_step_ours, m.extra_loss_ours)
        if m.peft is not None:
            from peft import get_peft_model

            models[f"{name} peft"] = (get_peft_model(copy.deepcopy(base), m.peft()), m.after_step_peft, None)
    return base, floor, models


def step_fn(model, after_step, extra_loss, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    count = [0]

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        (loss if extra_loss is None else loss + extra_loss(model)).backward()
        opt.step()
        count[0] += 1
        if after_step is not None:
            after_step(model, count[0])
        opt.zero_grad(set_to_none=True)

    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    base, floor, models = build(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _, _) in models.items()}

    def floor_step():
        floor(input_ids=ids, labels=ids).loss.backward()

    fns = {"floor": floor_step}
    for k, (m, after, extra) in models.items():
        m.train()
        fns[k] = step_fn(m, after, extra, ids)
    train = interleaved(fns, args.reps)
    for m, _, _ in models.values():
        m.eval()

    def fwd(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids)
        return run

    forward = interleaved({"base": fwd(base), **{k: fwd(m) for k, (m, _, _) in models.items()}}, args.reps)

    print(f"# bench/variants.py  {time.strftime('%Y-%m-%d %H:%M')}, 1 thread, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; batch {args.batch} x {args.seq}; "
          f"targets: all 7 projections; median of {args.reps} interleaved rounds\n")
    print("| method | library | trainable | step | step ÷ lorakit LoRA | step ÷ PEFT same method | step ÷ floor "
          "| forward ÷ base |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    lora = train.get("lora lorakit")
    for k in models:
        method, lib = k.rsplit(" ", 1)
        t = train[k]
        vs_lora = f"{paired_ratio(t.wall, lora.wall):.3f}×" if lora is not None else ""
        peft_key = f"{method} peft"
        vs_peft = f"{paired_ratio(t.wall, train[peft_key].wall):.3f}×" if lib == "lorakit" and peft_key in train else ""
        print(f"| {method} | {lib} | {counts[k]:,} | {fmt_time(median(t.wall))} | {vs_lora} | {vs_peft} "
              f"| {paired_ratio(t.wall, train['floor'].wall):.3f}× | {paired_ratio(forward[k].wall, forward['base'].wall):.3f}× |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
