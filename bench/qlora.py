"""QLoRA benchmark (issue 8): lorakit's QLoRA training step on a 4-bit NF4 base (double quantisation, fp32 compute)
against PEFT + bitsandbytes' QLoRA step and against both libraries' fp32 LoRA steps, in one interleaved run; the
bytes the quantised base takes per linear-layer weight; and each variant's peak memory, measured in its own process.

    python bench/qlora.py            # Llama hidden 512 x 4 layers, vocab 8000, batch 4 x 256, all-linear r=16, 1 thread
    python bench/qlora.py --quick    # a tiny model: checks the script runs

Steps run interleaved (A B C D, then reversed), one torch thread; a ratio is the median over rounds of neighbouring
runs (see bench/core.py). Every model holds the same A and B; the two QLoRA models quantise the same weights.
Peak memory: each variant builds its model and runs the same steps in a fresh process; `peak during the steps` is
the peak resident set size after the model was built and freed memory handed back (malloc_trim; Linux's VmHWM,
reset through /proc/self/clear_refs), `peak while building` the process's peak before that (loading and
quantising). ru_maxrss would not do: a child process inherits its parent's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakit  # noqa: E402
from core import fmt_time, interleaved, median, paired_ratio, spread  # noqa: E402

VARIANTS = ("lora lorakit", "qlora lorakit", "lora peft", "qlora peft")
STEP_TARGET_VS_LORA = 1.10  # our QLoRA step / our fp32 LoRA step
BYTES_TARGET = 0.53  # bytes of the NF4 + double-quantised base per linear-layer weight


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--memory-steps", type=int, default=3, help="steps each memory process runs")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant's process
    p.add_argument("--base-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab, args.batch, args.seq, args.reps = 128, 2, 256, 500, 2, 32, 2
        args.memory_steps = 1
    return args


def save_base(args, path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)


def build(variant: str, base_dir: Path, rank: int) -> torch.nn.Module:
    """One variant's model; the adapters' A and B come from one seed, the same in every variant."""
    kind, library = variant.split()
    model = lorakit.load_base_model(base_dir, quantize="nf4" if kind == "qlora" else None).requires_grad_(False)
    if library == "lorakit":
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
        factors = [(a.lora_A, a.lora_B) for _, _, a in lorakit.state.adapter_layers(model, "default")]
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        factors = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in model.modules()
                   if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for A, B in factors:  # B = 0 would make every output the base's
            A.copy_(torch.randn(A.shape, generator=g) * 0.02)
            B.copy_(torch.randn(B.shape, generator=g) * 0.02)
    return model


def step_fn(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def batch(args) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))


def peak_rss() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) * 1024


def measure_memory(args) -> int:
    """Child process: build one variant, run the steps, print its peak resident set sizes as JSON."""
    import ctypes
    import gc

    import bitsandbytes  # noqa: F401  every variant holds the library's code (~100 MB resident), used or not

    torch.set_num_threads(1)
    model = build(args.memory_of, Path(args.base_dir), args.rank).train()
    ids = batch(args)
    run = step_fn(model, ids)
    building = peak_rss()
    # transformers maps the checkpoint file: weights stay file pages, resident once read (a quantising load reads
    # them all, a plain one only as the steps touch them). Own copies make every variant's weights count alike.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what loading freed (the full-precision weights a quantising load replaced)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS: from here on it is the peak during the steps
    resident = peak_rss()
    for _ in range(args.memory_steps):
        run()
    print(json.dumps({"during_steps": peak_rss(), "building": building, "resident": resident}))
    return 0


def memory_of(variant: str, args, base_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--memory-of", variant, "--base-dir", str(base_dir),
           "--memory-steps", str(args.memory_steps), "--rank", str(args.rank), "--vocab", str(args.vocab),
           "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_of:
        return measure_memory(args)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        save_base(args, base_dir)
        models = {v: build(v, base_dir, args.rank) for v in VARIANTS}
        ids = batch(args)
        with torch.no_grad():
            logits = {v: m.eval()(input_ids=ids).logits for v, m in models.items()}
        nbytes, weights = lorakit.quant.storage_bytes(models["qlora lorakit"])
        fns = {}
        for v, m in models.items():
            m.train()
            fns[v] = step_fn(m, ids)
        train = interleaved(fns, args.reps)
        memory = {v: memory_of(v, args, base_dir) for v in VARIANTS}

    def r(a, b):
        return paired_ratio(train[a].wall, train[b].wall)

    ours, peft = "qlora lorakit", "qlora peft"
    print(f"# bench/qlora.py  {time.strftime('%Y-%m-%d %H:%M')}, 1 thread, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"bitsandbytes {__import__('bitsandbytes').__version__}")
    print(f"model: Llama hidden {args.hidden} x {args.layers} layers, intermediate {args.intermediate}, vocab {args.vocab}; "
          f"batch {args.batch} x {args.seq}; LoRA all-linear r={args.rank}; QLoRA base NF4 + double quantisation, "
          f"fp32 compute; AdamW; median of {args.reps} interleaved rounds")
    print(f"check: max |lorakit − PEFT| logits: fp32 LoRA {(logits['lora lorakit'] - logits['lora peft']).abs().max():.1e}, "
          f"QLoRA {(logits[ours] - logits[peft]).abs().max():.1e}; max |QLoRA − LoRA| (the rounding) "
          f"{(logits[ours] - logits['lora lorakit']).abs().max():.1e}\n")
    print("| what | lorakit | PEFT + bitsandbytes | target | met |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| QLoRA step | {fmt_time(median(train[ours].wall))} {spread(train[ours].wall)} | "
          f"{fmt_time(median(train[peft].wall))} {spread(train[peft].wall)} | | |")
    print(f"| QLoRA step ÷ PEFT's QLoRA step | {r(ours, peft):.3f}× | 1.000× | ≤ 1.00× | {'yes' if r(ours, peft) <= 1 else '**no**'} |")
    print(f"| QLoRA step ÷ same library's fp32 LoRA step | {r(ours, 'lora lorakit'):.3f}× | {r(peft, 'lora peft'):.3f}× "
          f"| ≤ {STEP_TARGET_VS_LORA:.2f}× (lorakit) | {'yes' if r(ours, 'lora lorakit') <= STEP_TARGET_VS_LORA else '**no**'} |")
    print(f"| fp32 LoRA step ÷ PEFT's fp32 LoRA step | {r('lora lorakit', 'lora peft'):.3f}× | 1.000× | | |")
    per_weight = nbytes / weights
    print(f"| quantised base, bytes per linear-layer weight | {per_weight:.4f} B ({nbytes / 2**20:.2f} MiB for "
          f"{weights / 1e6:.2f} M weights) | | ≤ {BYTES_TARGET} B | {'yes' if per_weight <= BYTES_TARGET else '**no**'} |")
    for key, what in (("resident", "RSS with the model built (before the steps)"),
                      ("during_steps", "peak RSS during the steps"), ("building", "peak RSS while building the model")):
        q, lo = memory[ours][key], memory["lora lorakit"][key]
        pq, pl = memory[peft][key], memory["lora peft"][key]
        print(f"| {what}: QLoRA (÷ fp32 LoRA) | {q / 2**20:.0f} MiB ({q / lo:.3f}×) | {pq / 2**20:.0f} MiB ({pq / pl:.3f}×) | | |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
