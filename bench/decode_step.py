"""Decode step with per-row adapters (issue 12): the three ways rows.py adds each row's adapter, and the engine
against a plain `generate` of the base, without HTTP.

    python bench/decode_step.py           # Llama hidden 512, 8 layers, vocab 8000 (serve_http.py's model), ~3 min
    python bench/decode_step.py --quick   # a tiny model, to check the script runs (~10 s)

Part 1: one decode step (16 rows, one new token each, a 40-token cache) with the base in four rows and adapters of
ranks 8, 16 and 32 (all-linear) in four rows each, timed by process CPU time, variants in turn, each keeping its
fastest: the base alone; the rows grouped by adapter (each group's products on its own rows, in place); the same
rows interleaved, all adapters side by side (one product for A, a mask, one for B); the slots gathered per row
(BGMV, two batched products per rank: the path before issue 12's rework, forced here by setting its limits to 0).
Part 2: the serving engine (continuous batching, 16 requests of 32 prompt and 32 generated tokens, the same mix of
adapters) in tokens/s against `model.generate` of the base at batch 16, in turn.
The table is printed and appended to docs/benchmarks.md under "Decode step (bench/decode_step.py)".
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import lorakit  # noqa: E402
from docs_section import add_to_section  # noqa: E402
from lorakit import rows  # noqa: E402

HEADING = "## Decode step (bench/decode_step.py)"
RANKS = (8, 16, 32)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--reps", type=int, default=15, help="timed steps per variant")
    p.add_argument("--runs", type=int, default=3, help="engine and generate runs each")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    p.add_argument("--quick", action="store_true", help="a tiny model: checks the script, not the speed")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.reps, args.runs = 64, 2, 500, 2, 1
    return args


def build(args):
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=max(4, args.hidden // 64), num_key_value_heads=max(2, args.hidden // 128),
                         vocab_size=args.vocab, max_position_embeddings=128, eos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    base = LlamaForCausalLM(config).eval()
    base.load_state_dict(model.state_dict())
    for r in RANKS:
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear"), adapter=f"r{r}",
                       trainable=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, base


def step_variants(model, args) -> dict[str, float]:
    """Fastest CPU time (ms) of one decode step per variant."""
    adapters = [f"r{r}" for r in RANKS]
    grouped = [None] * 4 + [a for a in adapters for _ in range(4)]
    interleaved = [None, *adapters] * 4
    limits = (rows.MAX_RUNS, rows.STACK_MAX_RANK)
    variants = {"base": ([None] * 16, limits), "grouped by adapter": (grouped, limits),
                "interleaved, side by side": (interleaved, limits), "interleaved, slots gathered": (interleaved, (0, 0))}
    prompt = 40

    layers = [m for m in model.modules() if hasattr(m, "row_slots")]

    def one(names, lim) -> float:
        rows.MAX_RUNS, rows.STACK_MAX_RANK = lim
        for layer in layers:  # each layer keeps its last layout: re-derive it under these limits
            if layer.row_slots is not None:
                layer.row_slots.prepared = None
        cache = DynamicCache()
        with torch.inference_mode(), lorakit.adapter_rows(model, [None] * 16):
            model(torch.randint(0, args.vocab, (16, prompt)), past_key_values=cache, use_cache=True, logits_to_keep=1)
        kw = dict(attention_mask=torch.ones(16, prompt + 1, dtype=torch.long), position_ids=torch.full((16, 1), prompt))
        plan = lorakit.adapters.row_plan(model, names)
        with torch.inference_mode(), lorakit.adapter_rows(model, plan):  # the layouts made once, as the engine keeps them
            model(torch.randint(0, args.vocab, (16, 1)), past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            t0 = time.process_time()
            model(torch.randint(0, args.vocab, (16, 1)), past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
            return time.process_time() - t0

    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for _ in range(args.reps + 1):
            for k, (names, lim) in variants.items():
                times[k].append(one(names, lim))
    finally:
        rows.MAX_RUNS, rows.STACK_MAX_RANK = limits
    return {k: min(v[1:]) * 1e3 for k, v in times.items()}


def engine_vs_generate(model, base, args) -> tuple[float, float]:
    """(engine tokens/s, generate tokens/s), medians over args.runs runs in turn."""
    from lorakit.serve.engine import Engine
    from lorakit.serve.jobs import Job
    from lorakit.serve.sampling import SamplingParams

    class Names:  # the adapters are on the model already: a name is its own pin
        def acquire(self, name):
            return name

        def release(self, name):
            pass

    class Ids:  # the engine's text stream only needs decode()
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    engine = Engine(model, Ids(), adapters=Names(), max_batch=16, max_queue=64, eos_token_ids=set()).start()
    choices = [None, *(f"r{r}" for r in RANKS)]
    n, prompt, new = 16, 32, 32
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.vocab, (n, prompt), generator=g)

    def run_engine() -> float:
        left, done, lock = [n], threading.Event(), threading.Lock()

        def on_event(event):
            if event.finish_reason:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        jobs = [Job(prompts[i].tolist(), params, on_event, adapter=choices[i % 4]) for i in range(n)]
        t0 = time.perf_counter()
        engine.submit_many(jobs)
        done.wait()
        return n * new / (time.perf_counter() - t0)

    def run_generate() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            base.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
        return n * new / (time.perf_counter() - t0)

    try:
        run_engine(), run_generate()
        results = [(run_engine(), run_generate()) for _ in range(args.runs)]
    finally:
        engine.stop()
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def report(args, steps: dict[str, float], engine: float, generate: float) -> str:
    base = steps["base"]
    lines = [f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; 16 rows: the base in 4, adapters of "
             f"ranks {'/'.join(map(str, RANKS))} (all-linear) in 4 each; 1 torch thread; {platform.machine()}, "
             f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| decode step (16 rows, 1 token each) | CPU ms (fastest of " + str(args.reps) + ") | ÷ base |",
             "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v:.2f} | {v / base:.3f} |" for k, v in steps.items()]
    lines += ["", f"Engine (16 requests, 32 + 32 tokens, the same adapters, no HTTP): {engine:.1f} tokens/s; plain "
              f"`generate` of the base at batch 16: {generate:.1f} tokens/s; ratio {engine / generate:.3f} "
              f"(median of {args.runs} runs each, in turn)."]
    return "\n".join(lines)



def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    model, base = build(args)
    steps = step_variants(model, args)
    engine, generate = engine_vs_generate(model, base, args)
    text = report(args, steps, engine, generate)
    print(text)
    if not args.no_write and not args.quick:
        intro = f"`python bench/decode_step.py`: {__doc__.splitlines()[0]}"
        print(f"\nadded to {add_to_section(HEADING, intro, text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
