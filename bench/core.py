"""Core benchmark (issue 2): lorakit's LoRA training step and forward pass against the frozen-model floor and
PEFT on the same weights, plus the cost of merge, unmerge, save, load and switching adapters.

    python bench/core.py               # LlamaForCausalLM hidden 512, 8 layers, batch 8 x 256, 1 thread
    python bench/core.py --threads 1,2 # the same at 1 and then 2 torch threads
    python bench/core.py --quick       # a tiny model, to check the script runs (~20 s)
    python bench/core.py --before REV  # also time lorakit as of git revision REV, in the same run (a refactor's check)

The default run takes about 7 minutes on an idle 2-core machine, twice that when other work shares the
cores. The variants run in turn (A, B, C, C, B, A, ...), so the noise of a shared machine falls on every
side alike; a ratio is the median over rounds of the two neighbours' ratio, by wall clock and by this
process's CPU time (which does not count waiting for a busy core). The output is markdown, ready for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations PEFT triggers

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lorakit  # noqa: E402

TRAIN_TARGET = 1.05  # LoRA step / frozen floor
FORWARD_TARGET = 1.10  # unmerged forward / base forward
MERGED_TOLERANCE = 1.02  # "merged = base": the same ops, so anything above this is noise or overhead


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    # One thread by default: with two, each op can stall ~15 ms whenever the other core is busy.
    p.add_argument("--threads", default="1", help="comma-separated torch thread counts to measure, e.g. '1' or '1,2'")
    p.add_argument("--train-reps", type=int, default=5, help="timed training steps per variant (after one warm-up)")
    p.add_argument("--forward-reps", type=int, default=5, help="timed forward passes per variant (after one warm-up)")
    p.add_argument("--op-reps", type=int, default=5, help="timed merge/unmerge/save/load/switch calls")
    p.add_argument("--before", metavar="REV", help="also time lorakit as of this git revision (imported as lorakit_before)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few repetitions: checks the script, not the speed")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads = 128, 2, 344, 4
        args.vocab, args.batch, args.seq = 1000, 2, 64
        args.threads, args.train_reps, args.forward_reps, args.op_reps = "1", 3, 3, 3
    args.threads = [int(t) for t in str(args.threads).split(",")]
    return args


# --- models --------------------------------------------------------------------------------------


def build_models(args: argparse.Namespace):
    """The frozen base, lorakit on a copy and PEFT on another copy, both adapters holding the same A and B."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).requires_grad_(False)
    # The floor: the same frozen model with the embedding output requiring grad, so backward runs through
    # every layer but computes activation gradients only. It also computes the gradient into layer 0's
    # q/k/v inputs, which a LoRA step skips (nothing below them trains): about 1% of the step here.
    floor = copy.deepcopy(base)
    floor.enable_input_require_grads()

    ours = copy.deepcopy(base)
    lorakit.inject(ours, lorakit.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 would make every comparison trivially equal to the base
        for layer in ours.modules():
            if isinstance(layer, lorakit.LoraLayer):
                torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.02)

    peft = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    inner = peft.base_model.model
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, lorakit.LoraLayer):
                theirs = inner.get_submodule(name)
                theirs.lora_A["default"].weight.copy_(layer.adapters["default"].lora_A)
                theirs.lora_B["default"].weight.copy_(layer.adapters["default"].lora_B)
    return base, floor, ours, peft


def import_revision(rev: str):
    """lorakit as of git revision `rev`, importable next to today's as `lorakit_before` (its imports are relative)."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-before-"))
    archive = subprocess.run(["git", "archive", rev, "src/lorakit"], cwd=root, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "src" / "lorakit").rename(tmp / "lorakit_before")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("lorakit_before")


def build_before(old, base, ours, rank: int):
    """The same adapter (same A and B) injected by the old lorakit into another copy of the base."""
    model = copy.deepcopy(base)
    old.inject(model, old.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, lorakit.LoraLayer):
                theirs = model.get_submodule(name).adapters["default"]
                theirs.lora_A.copy_(layer.adapters["default"].lora_A)
                theirs.lora_B.copy_(layer.adapters["default"].lora_B)
    return model


def check_same_outputs(base, ours, peft, ids) -> tuple[float, float]:
    """Max |lorakit − PEFT| and max |lorakit − base| of the logits: the first must be ~0, the second not."""
    with torch.no_grad():
        a, b, c = ours(input_ids=ids).logits, peft(input_ids=ids).logits, base(input_ids=ids).logits
    return (a - b).abs().max().item(), (a - c).abs().max().item()


# --- timing --------------------------------------------------------------------------------------


@dataclass
class Times:
    """Seconds per call: wall clock, and this process's CPU time (not counting time spent waiting for a core)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def __iadd__(self, other: "Times") -> "Times":
        self.wall += other.wall
        self.cpu += other.cpu
        return self


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, Times]:
    """Time each function, run in turn, the order reversed every round (A B C, C B A, ...)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: Times() for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times[name].cpu.append(time.process_time() - cpu)
            times[name].wall.append(time.perf_counter() - wall)
    return times


def median(ts: list[float]) -> float:
    return statistics.median(ts)


def spread(ts: list[float]) -> str:
    """Half the range over the median: how far to trust the median on this machine."""
    return f"±{50 * (max(ts) - min(ts)) / median(ts):.0f}%" if len(ts) > 1 else ""


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


# --- measurements --------------------------------------------------------------------------------


def train_steps(floor, ours, peft, ids, reps: int, before=None) -> dict[str, Times]:
    """Forward + backward (+ AdamW on the adapters) on the same batch; the floor trains nothing."""
    def adamw(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def floor_step():
        floor(input_ids=ids, labels=ids).loss.backward()

    def step(model, opt):
        def run():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    models = [floor, ours, peft] + ([before] if before is not None else [])
    fns = {"floor": floor_step, "lorakit": step(ours, adamw(ours)), "peft": step(peft, adamw(peft))}
    if before is not None:
        fns["lorakit before"] = step(before, adamw(before))
    for m in models:
        m.train()
    try:
        return interleaved(fns, reps)
    finally:
        for m in models:
            m.eval()


def forwards(base, ours, merged, peft, ids, reps: int, before=None) -> dict[str, Times]:
    def fwd(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids)
        return run

    fns = {"base": fwd(base), "lorakit": fwd(ours), "lorakit merged": fwd(merged), "peft": fwd(peft)}
    if before is not None:
        fns["lorakit before"] = fwd(before)
    return interleaved(fns, reps)


def operations(base, ours, peft, args, workdir: Path) -> list[tuple[str, Times, Times, str]]:
    """(operation, lorakit's times, PEFT's times, the PEFT call timed)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel

    rows = []
    # merge and unmerge must alternate, so each round times merge (both libraries) and then unmerge (both).
    merge_t, unmerge_t = {"ours": Times(), "peft": Times()}, {"ours": Times(), "peft": Times()}
    for rep in range(args.op_reps + 1):  # round 0 is the warm-up
        m = interleaved({"ours": lambda: lorakit.merge(ours), "peft": peft.merge_adapter}, 1, warmup=0)
        u = interleaved({"ours": lambda: lorakit.unmerge(ours), "peft": peft.unmerge_adapter}, 1, warmup=0)
        for k in ("ours", "peft"):
            if rep:
                merge_t[k] += m[k]
                unmerge_t[k] += u[k]
    rows.append(("merge", merge_t["ours"], merge_t["peft"], "merge_adapter()"))
    rows.append(("unmerge (lorakit restores the kept weight, PEFT subtracts)", unmerge_t["ours"], unmerge_t["peft"],
                 "unmerge_adapter()"))

    ours_dir, peft_dir = workdir / "ours", workdir / "peft"
    times = interleaved({"ours": lambda: lorakit.save_adapter(ours, ours_dir), "peft": lambda: peft.save_pretrained(peft_dir)},
                        args.op_reps)
    rows.append(("save_adapter", times["ours"], times["peft"], "save_pretrained()"))

    fresh: dict[str, torch.nn.Module] = {}

    def load_ours():
        lorakit.load_adapter(fresh.pop("ours"), ours_dir)

    def load_peft():
        PeftModel.from_pretrained(fresh.pop("peft"), peft_dir)

    times = {"ours": Times(), "peft": Times()}
    for _ in range(args.op_reps):  # each load goes onto a fresh copy of the plain base (copying is not timed)
        fresh["ours"], fresh["peft"] = copy.deepcopy(base), copy.deepcopy(base)
        for k, v in interleaved({"ours": load_ours, "peft": load_peft}, 1, warmup=0).items():
            times[k] += v
    rows.append(("load_adapter onto a plain model", times["ours"], times["peft"], "PeftModel.from_pretrained()"))

    lorakit.add_adapter(ours, lorakit.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"),
                        adapter="other", activate=False)
    peft.add_adapter("other", PeftLoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    calls = {"ours": 0, "peft": 0}

    def switch_ours():  # each call swaps between the two adapters
        calls["ours"] += 1
        lorakit.set_active(ours, "other" if calls["ours"] % 2 else "default")

    def switch_peft():
        calls["peft"] += 1
        peft.set_adapter("other" if calls["peft"] % 2 else "default")

    reps = max(20, args.op_reps)
    times = interleaved({"ours": switch_ours, "peft": switch_peft}, reps)
    rows.append(("switch active adapter", times["ours"], times["peft"], "set_adapter() (also flips requires_grad)"))
    lorakit.set_active(ours, "default")
    peft.set_adapter("default")
    return rows


# --- report --------------------------------------------------------------------------------------


def paired_ratio(mine: list[float], ref: list[float]) -> float:
    """Median over rounds of mine/ref: the two ran next to each other, so a slow spell hits both."""
    return median([m / r for m, r in zip(mine, ref)])


def ratio_row(what: str, mine: Times, ref: Times, target: str = "", limit: float | None = None) -> str:
    """One table row; with a limit, whether the wall-clock ratio and the CPU-time ratio are within it."""
    wall, cpu = paired_ratio(mine.wall, ref.wall), paired_ratio(mine.cpu, ref.cpu)
    met = "" if limit is None else " / ".join("yes" if r <= limit else "**no**" for r in (wall, cpu))
    return (f"| {what} | {fmt_time(median(mine.wall))} {spread(mine.wall)} | {fmt_time(median(ref.wall))} {spread(ref.wall)} "
            f"| {wall:.3f}× | {cpu:.3f}× | {target} | {met} |")


def report_threads(n: int, train: dict[str, Times], fwd: dict[str, Times]) -> list[str]:
    below_one = 1.0 - 1e-9  # "faster than PEFT": strictly below 1
    return [
        f"| {n} thread{'s' if n > 1 else ''} | time (median ± half range) | reference | ratio (wall) | ratio (CPU) "
        "| target | met (wall / CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        ratio_row("train step: lorakit / floor", train["lorakit"], train["floor"], f"≤ {TRAIN_TARGET:.2f}×", TRAIN_TARGET),
        ratio_row("train step: lorakit / PEFT", train["lorakit"], train["peft"], "< 1.00×", below_one),
        ratio_row("train step: PEFT / floor", train["peft"], train["floor"]),
        ratio_row("forward, unmerged: lorakit / base", fwd["lorakit"], fwd["base"], f"≤ {FORWARD_TARGET:.2f}×", FORWARD_TARGET),
        ratio_row("forward, merged: lorakit / base", fwd["lorakit merged"], fwd["base"], f"= base (≤ {MERGED_TOLERANCE:.2f}×)",
                  MERGED_TOLERANCE),
        ratio_row("forward, unmerged: PEFT / base", fwd["peft"], fwd["base"]),
        ratio_row("forward, unmerged: lorakit / PEFT", fwd["lorakit"], fwd["peft"]),
    ] + ([
        ratio_row("train step: lorakit / lorakit before", train["lorakit"], train["lorakit before"], "≤ 1.00× (noise)"),
        ratio_row("train step: lorakit before / floor", train["lorakit before"], train["floor"]),
        ratio_row("forward, unmerged: lorakit / lorakit before", fwd["lorakit"], fwd["lorakit before"], "≤ 1.00× (noise)"),
    ] if "lorakit before" in train else [])


def report_ops(n: int, rows: list[tuple[str, Times, Times, str]]) -> list[str]:
    lines = [f"| operation ({n} thread{'s' if n > 1 else ''}, wall, median) | lorakit | PEFT | lorakit / PEFT | PEFT's call |",
             "| --- | --- | --- | --- | --- |"]
    for name, ours, theirs, call in rows:
        mine, ref = median(ours.wall), median(theirs.wall)
        lines.append(f"| {name} | {fmt_time(mine)} | {fmt_time(ref)} | {mine / ref:.2f}× | {call} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    base, floor, ours, peft = build_models(args)
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    n_adapted = sum(isinstance(m, lorakit.LoraLayer) for m in ours.modules())
    params = sum(p.numel() for p in base.parameters())
    trainable = lorakit.trainable_parameters(ours, verbose=False).trainable
    diff_peft, diff_base = check_same_outputs(base, ours, peft, ids)
    before = build_before(import_revision(args.before), base, ours, args.rank) if args.before else None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    print(f"# bench/core.py  {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; python {sys.version.split()[0]}")
    print(f"model: LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"{args.heads} heads, vocab {args.vocab}: {params / 1e6:.1f} M parameters; batch {args.batch} × {args.seq} tokens")
    print(f"LoRA: r={args.rank}, alpha={2 * args.rank}, all-linear = {n_adapted} layers, {trainable / 1e6:.2f} M trainable; "
          f"fp32; AdamW on the adapters")
    print(f"check: max |lorakit − PEFT| logits = {diff_peft:.2e} (same weights), max |lorakit − base| = {diff_base:.2e}")
    if before is not None:
        with torch.no_grad():
            diff_before = (before(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
        print(f"before: lorakit as of {args.before}; max |lorakit − lorakit before| logits = {diff_before:.2e}")
    print(f"repetitions: train {args.train_reps}, forward {args.forward_reps}, operations {args.op_reps} "
          f"(+1 warm-up each), interleaved; load average at start {os.getloadavg()[0]:.1f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(ours, Path(tmp) / "start")
        merged = copy.deepcopy(base)
        lorakit.load_adapter(merged, Path(tmp) / "start")
        lorakit.merge(merged)
        with torch.no_grad():
            diff_merged = (merged(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
        print(f"check: max |merged − unmerged| logits = {diff_merged:.2e}\n")
        for n in args.threads:
            torch.set_num_threads(n)
            train = train_steps(floor, ours, peft, ids, args.train_reps, before)
            fwd = forwards(base, ours, merged, peft, ids, args.forward_reps, before)
            print("\n".join(report_threads(n, train, fwd)) + "\n", flush=True)
        torch.set_num_threads(args.threads[0])
        rows = operations(base, ours, peft, args, Path(tmp))
        print("\n".join(report_ops(args.threads[0], rows)) + "\n")
    print(f"total {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f} "
          f"(above 1 means other work shared the {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
