"""Mixed-adapter forward (issue 4): tokens/s of one batch whose rows use 1, 8 or 32 distinct adapters, against the
same batch on the base model and on a single adapter, for lorakit (`adapter_names=`) and PEFT (`adapter_names=`);
for a whole forward pass and for one decoding step with a KV cache.

    python bench/serve_forward.py            # LlamaForCausalLM hidden 512, 4 layers, batch 32 x 64, two LoRA setups (~10 min)
    python bench/serve_forward.py --quick    # a tiny model, to check the script runs (~15 s)

Both libraries hold the same 32 adapters (saved by lorakit, loaded by both) and are checked to give the same
logits. Time is the process's CPU time with one torch thread: on a shared machine, wall-clock time also counts
the time spent waiting for a core, which swamps a 10% difference. Passes of all variants are taken in turn
(A, B, C, C, B, A, ...) and each variant keeps its fastest. The output is a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lorakit  # noqa: E402

TARGET_VS_BASE = 0.90  # 32 distinct adapters in one batch / base throughput
SETUPS = {"all-linear:16": ("all-linear", 16), "qv:8": (["q_proj", "v_proj"], 8)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--mixes", default="1,8,32", help="numbers of distinct adapters in the batch")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"LoRA setups (targets:rank), some of {list(SETUPS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP stalls on a shared machine)")
    p.add_argument("--reps", type=int, default=7, help="timed passes per variant (after one warm-up)")
    p.add_argument("--all-logits", action="store_true",
                   help="compute logits at every position (default: the last only, as a server's prefill does)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few repetitions: checks the script, not the speed")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads, args.vocab = 128, 2, 344, 4, 1000
        args.batch, args.seq, args.reps, args.mixes = 8, 16, 2, "1,4,8"
    args.mixes = [int(m) for m in str(args.mixes).split(",")]
    args.setups = [s for s in str(args.setups).split(",") if s]
    return args


def build(args: argparse.Namespace, targets, rank: int, workdir: Path):
    """The base, lorakit and PEFT copies of it, each holding the same `max(mixes)` adapters."""
    from peft import PeftModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).eval().requires_grad_(False)
    n = max(args.mixes)
    paths = []
    maker = copy.deepcopy(base)
    for i in range(n):  # B starts at zero: give every adapter random non-zero factors, then save it
        lorakit.inject(maker, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules=targets), adapter=f"a{i}")
        with torch.no_grad():
            for name, p in maker.named_parameters():
                if f".a{i}.lora_" in name:
                    p.normal_(0, 0.02)
        paths.append(lorakit.save_adapter(maker, workdir / f"a{i}", adapter=f"a{i}"))
    del maker

    ours = copy.deepcopy(base)
    for i, path in enumerate(paths):
        lorakit.load_adapter(ours, path, adapter=f"a{i}", activate=False)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name="a0").eval()
    for i, path in enumerate(paths[1:], 1):
        peft.load_adapter(str(path), adapter_name=f"a{i}")
    return base, ours, peft


def variants(args, base, ours, peft) -> dict[str, tuple]:
    """name -> (model, keyword arguments, what to call before each pass)."""
    kw = {} if args.all_logits else {"logits_to_keep": 1}
    out = {
        "base": (base, kw, None),
        "lorakit 1 adapter": (ours, kw, lambda: lorakit.set_active(ours, "a0")),
        "peft 1 adapter": (peft, kw, lambda: peft.set_adapter("a0")),
    }
    for k in args.mixes:
        rows = [f"a{i % k}" for i in range(args.batch)]
        out[f"lorakit mixed {k}"] = (ours, {**kw, "adapter_names": rows}, None)
        out[f"peft mixed {k}"] = (peft, {**kw, "adapter_names": rows}, None)
    return out


def forward_pass(model, kw: dict, before, ids: torch.Tensor):
    """One forward pass over the whole batch."""

    def run():
        if before is not None:
            before()
        model(input_ids=ids, **kw)

    return run


def decode_step(model, kw: dict, before, ids: torch.Tensor):
    """One decoding step (one new token per row) after a prefill of `ids`; the cache is cropped back after
    each step, so every call does the same work."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if before is not None:
        before()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, **kw)
    last = ids[:, -1:]

    def run():
        if before is not None:
            before()
        model(input_ids=last, past_key_values=cache, use_cache=True, **kw)
        cache.crop(-1)  # drop the token just added

    return run


def check_same_logits(args, ours, peft, ids) -> float:
    """lorakit's and PEFT's mixed batches compute the same thing (else the timings compare different work)."""
    names = [f"a{i % max(args.mixes)}" for i in range(ids.shape[0])]
    names[0] = None  # and a base row
    with torch.no_grad():
        a = ours(ids, adapter_names=names).logits
        b = peft(input_ids=ids, adapter_names=["__base__" if n is None else n for n in names]).logits
    return float((a - b).abs().max())


def measure(fns: dict, reps: int) -> dict[str, float]:
    """Fastest CPU seconds per call of each function, timed in turn, forwards then backwards."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn()
        for rep in range(reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                start = time.process_time()
                fns[name]()
                times[name].append(time.process_time() - start)
    return {name: min(t) for name, t in times.items()}


def table(args, results: dict[str, dict[str, float]], tokens: int, what: str) -> list[str]:
    lines = [
        f"| LoRA setup | {what} | lorakit tok/s | × base | PEFT tok/s | × base | lorakit / PEFT |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setup, res in results.items():
        base = tokens / res["base"]
        lines.append(f"| {setup} | base model | {base:,.0f} | 1.00 | {base:,.0f} | 1.00 | 1.00 |")
        rows = [("1 adapter (set_active)", "lorakit 1 adapter", "peft 1 adapter")]
        rows += [(f"mixed, {k} distinct", f"lorakit mixed {k}", f"peft mixed {k}") for k in args.mixes]
        for label, ours, theirs in rows:
            a, b = tokens / res[ours], tokens / res[theirs]
            lines.append(f"| {setup} | {label} | {a:,.0f} | {a / base:.2f} | {b:,.0f} | {b / base:.2f} | {a / b:.2f} |")
    return lines


def report(args, forward: dict, decode: dict, diffs: dict[str, float]) -> str:
    lines = [
        f"Measured {datetime.date.today()} on {platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} torch "
        f"thread(s), torch {torch.__version__}; LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, "
        f"intermediate {args.intermediate}, vocab {args.vocab}, fp32, no_grad; batch {args.batch} rows, row i using "
        f"adapter i mod k; {'all' if args.all_logits else 'last-position'} logits; tokens per CPU second, best of "
        f"{args.reps} passes.",
        "",
        f"Forward pass, {args.batch} x {args.seq} tokens:",
        "",
        *table(args, forward, args.batch * args.seq, "batch"),
        "",
        f"Decoding step, one new token per row after a {args.seq}-token prefill (KV cache):",
        "",
        *table(args, decode, args.batch, "batch"),
        "",
        "Largest |lorakit − PEFT| logit difference on a mixed batch (with a base row): "
        + ", ".join(f"{s}: {d:.1e}" for s, d in diffs.items()) + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    forward, decode, diffs, ok = {}, {}, {}, True
    for setup in args.setups:
        targets, rank = SETUPS[setup]
        with tempfile.TemporaryDirectory() as tmp:
            base, ours, peft = build(args, targets, rank, Path(tmp))
        diffs[setup] = check_same_logits(args, ours, peft, ids)
        print(f"{setup}: timing ...", file=sys.stderr, flush=True)
        specs = variants(args, base, ours, peft)
        res = forward[setup] = measure({name: forward_pass(*spec, ids) for name, spec in specs.items()}, args.reps)
        decode[setup] = measure({name: decode_step(*spec, ids) for name, spec in specs.items()}, args.reps)
        k = max(args.mixes)
        ratio = res["base"] / res[f"lorakit mixed {k}"]
        faster = all(res[f"lorakit mixed {m}"] < res[f"peft mixed {m}"] for m in args.mixes)
        ok &= ratio >= TARGET_VS_BASE and faster
        print(f"{setup}: {k} distinct adapters at {ratio:.2f}x base (target >= {TARGET_VS_BASE}); "
              f"faster than PEFT's mixed path at every mix: {faster}", file=sys.stderr)
        del base, ours, peft
    print(report(args, forward, decode, diffs))
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
