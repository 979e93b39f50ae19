"""Variants benchmark (issue 7): per method, trainable parameters, the training step against lorakit's plain
LoRA step and against PEFT's same method, the multiply-adds of that step, and the unmerged forward against the
base, in one run.

    python bench/variants.py            # Llama hidden 512, 4 layers, vocab 8000, batch 4 x 256, all 7 projections
    python bench/variants.py --quick    # a tiny model: checks the script runs
    python bench/variants.py --methods lora,dora

All steps run interleaved (A B C ..., then reversed), one torch thread; ratios are medians over rounds of
neighbouring runs (see bench/core.py), so noise on a shared machine falls on every method alike.
After the timed rounds one more step per model is counted, not timed: the multiply-adds of its matrix products
(torch's FlopCounterMode, plus the ops it misses here, UNCOUNTED). With VeRA, the count is set against what
an exact VeRA step and a LoRA step need at least on this model's shapes (`vera_macs`, `lora_macs`).
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
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402
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


# --- multiply-adds ---------------------------------------------------------------------------------
# FlopCounterMode counts matrix products (mm, addmm, bmm, attention; 2 FLOPs per multiply-add), not
# element-wise work or matrix-vector products. Its registry leaves out the in-place addmm_ (lorakit adds a
# low-rank term row by row with it) and the CPU kernel of scaled_dot_product_attention (counted here with
# torch's formulas for its other kernels: full s × s scores, recomputed in backward); without these a step's
# count would miss real products. Formulas get shapes (FlopCounterMode's custom_mapping).
aten = torch.ops.aten
UNCOUNTED = {
    aten.addmm_: lambda c, a, b, *_, out_shape=None, **__: 2 * a[0] * a[1] * b[1],
    aten.baddbmm_: lambda c, a, b, *_, out_shape=None, **__: 2 * a[0] * a[1] * a[2] * b[2],
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda dout, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(dout, q, k, v),
}


def fmt_macs(n: int) -> str:
    return f"{n / 1e9:.2f} G" if abs(n) >= 1e9 else f"{n / 1e6:.2f} M"


def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-adds of the matrix products one call of `fn` runs."""
    with FlopCounterMode(display=False, custom_mapping=UNCOUNTED) as counter:
        fn()
    return counter.get_total_flops() // 2


@dataclass
class Projection:
    """One adapted projection as a step sees it: its widths, whether its input needs a gradient (the first
    block's q/k/v read the frozen embedding: no), and whether it is the first to read that input (VeRA's
    x·Aᵀ is the same for all of them: q/k/v, gate/up)."""

    inp: int
    out: int
    dx: bool
    first_reader: bool


def adapted_projections(model: torch.nn.Module, ids: torch.Tensor) -> list[Projection]:
    """The adapted projections of a model with adapters on TARGETS, from one forward with autograd on."""
    found, inputs = [], []

    def hook(module, args, output):
        x = args[0]
        found.append(Projection(x.shape[-1], output.shape[-1], x.requires_grad, not any(x is t for t in inputs)))
        inputs.append(x)  # held to the end of the forward: an identity check needs the tensor alive

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return found


def lora_macs(p: Projection, rows: int, r: int, row_by_row: bool = False) -> int:
    """Multiply-adds a LoRA rank-r step adds to a frozen projection's own. Row by row, as the formula reads:
    6 products of width r (x·Aᵀ, ·Bᵀ; dy·B, its ·A for dx, A's and B's gradients), 5 without dx. Fewest: the
    4 that the gradients of A and B need over the rows (x·Aᵀ, dy·B, dyᵀ·t, (dy·B)ᵀ·x), and for the forward's
    and dx's low-rank term the cheaper of row by row and folding s·B·A into the weight (out·in·r)."""
    if row_by_row:
        return rows * r * (3 * (p.inp + p.out) - (0 if p.dx else p.inp))
    fold = p.out * p.inp * r
    return 2 * rows * r * (p.inp + p.out) + min(rows * r * p.out, fold) + (min(rows * r * p.inp, fold) if p.dx else 0)


def vera_macs(p: Projection, rows: int, r: int, row_by_row: bool = False) -> int:
    """Multiply-adds a VeRA rank-r step adds to a frozen projection's own. Row by row, as the formula reads:
    4 products of width r (x·Aᵀ and (λ_d⊙u)·Bᵀ forward; dy·(λ_b⊙B) for λ_d's gradient and its ·A for dx),
    3 without dx. Fewest: u = x·Aᵀ once per input (both λ gradients need it), then the cheapest of three
    exact schemes: fold λ_b⊙B·λ_d⊙A into the weight for the forward and for dx (out·in·r each), both λ
    gradients from dyᵀ·u; or row by row forward (its (λ_d⊙u)·Bᵀ gives λ_b's gradient), dy·(λ_b⊙B) for
    λ_d's and for dx (·A, or the folded weight); or a folded forward with both dyᵀ·u and dy·(λ_b⊙B).
    No scheme here keeps a folded weight from forward to backward (LoRA's fused path does not either)."""
    if row_by_row:
        return rows * r * (2 * (p.inp + p.out) - (0 if p.dx else p.inp))
    fold, by_out, by_in = p.out * p.inp * r, rows * r * p.out, rows * r * p.inp
    u = by_in if p.first_reader else 0
    return u + min(fold + by_out + (fold if p.dx else 0),
                   2 * by_out + (min(by_in, fold) if p.dx else 0),
                   fold + 2 * by_out + (by_in if p.dx else 0))


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


def vera_against_lora(macs: dict[str, int], projections: list[Projection], rows: int) -> list[str]:
    """Markdown: VeRA's multiply-adds beyond the frozen layers' own against LoRA's, as the formulas read (row by
    row), the fewest an exact step needs, and as counted; and what each makes of the whole step ÷ LoRA's."""
    r_vera, r_lora = METHODS["vera"].ours().r, METHODS["lora"].ours().r
    # what the frozen layers compute in an adapted model: the floor's products less the input gradients that
    # nothing needs there (the floor's embedding output asks for one; an adapted model's does not)
    frozen = macs["floor"] - sum(rows * p.inp * p.out for p in projections if not p.dx)

    def analytic(fn, r, row_by_row):
        return sum(fn(p, rows, r, row_by_row) for p in projections)

    def counted(key):
        return macs[key] - frozen if key in macs else None

    def line(what, vera, lora):
        g = [fmt_macs(x) if x is not None else "" for x in (vera, lora)]
        ratio = f"{(frozen + vera) / (frozen + lora):.3f}×" if vera is not None and lora is not None else ""
        return f"| {what} | {g[0]} | {g[1]} | {ratio} |"

    return [
        f"VeRA r={r_vera} against LoRA r={r_lora}, multiply-adds beyond the frozen layers' own products "
        f"({fmt_macs(frozen)}): from the shapes of the {len(projections)} adapted projections and {rows} rows (first "
        "two rows), and counted; the last column is (frozen + VeRA) ÷ (frozen + LoRA):\n",
        "| count | VeRA | LoRA | step ÷ LoRA step |",
        "| --- | --- | --- | --- |",
        line("row by row, as the formulas read (VeRA: 4 products of width r per projection; LoRA: 6)",
             analytic(vera_macs, r_vera, True), analytic(lora_macs, r_lora, True)),
        line("fewest exact (VeRA's x·Aᵀ once per input; a low-rank term folded into the weight where that is fewer)",
             analytic(vera_macs, r_vera, False), analytic(lora_macs, r_lora, False)),
        line("lorakit, counted", counted("vera lorakit"), counted("lora lorakit")),
        line("PEFT, counted", counted("vera peft"), counted("lora peft")),
    ]


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
    macs = {k: count_macs(fn) for k, fn in fns.items()}  # one more step each, past the warm-up: a steady one
    projections = adapted_projections(next(m for k, (m, _, _) in models.items() if k.endswith(" lorakit")), ids)
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
    print("| method | library | trainable | step | step ÷ lorakit LoRA | FLOPs ÷ lorakit LoRA | step ÷ PEFT same method "
          "| step ÷ floor | forward ÷ base |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lora = train.get("lora lorakit")
    lora_count = macs.get("lora lorakit")
    for k in models:
        method, lib = k.rsplit(" ", 1)
        t = train[k]
        vs_lora = f"{paired_ratio(t.wall, lora.wall):.3f}×" if lora is not None else ""
        macs_vs_lora = f"{macs[k] / lora_count:.3f}×" if lora_count else ""
        peft_key = f"{method} peft"
        vs_peft = f"{paired_ratio(t.wall, train[peft_key].wall):.3f}×" if lib == "lorakit" and peft_key in train else ""
        print(f"| {method} | {lib} | {counts[k]:,} | {fmt_time(median(t.wall))} | {vs_lora} | {macs_vs_lora} | {vs_peft} "
              f"| {paired_ratio(t.wall, train['floor'].wall):.3f}× | {paired_ratio(forward[k].wall, forward['base'].wall):.3f}× |")
    floor_vs_lora = f" = {macs['floor'] / lora_count:.3f}× lorakit LoRA's {fmt_macs(lora_count)}" if lora_count else ""
    print(f"\nMultiply-adds of one step's matrix products (counted): floor (the frozen model, with input gradients) "
          f"{fmt_macs(macs['floor'])}{floor_vs_lora}.")
    if "vera" in args.methods:
        print("\n" + "\n".join(vera_against_lora(macs, projections, args.batch * args.seq)))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
