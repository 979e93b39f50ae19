"""Compose benchmark (issue 9): combining 2, 8 and 32 adapters against PEFT's add_weighted_adapter, the forward
cost of a 4-expert mixture against a single adapter, and extract's time and peak memory on the built-in model.

    python bench/compose.py                 # bench model: Llama hidden 512 x 8 layers, all-linear r=16; 1 thread
    python bench/compose.py --quick         # tiny model, checks the script
    python bench/compose.py --skip-extract  # no built-in model needed

Timings interleave lorakit and PEFT (A B, B A, ...) and report medians and the paired ratio (see bench/core.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
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
from core import fmt_time, interleaved, median, paired_ratio  # noqa: E402

METHODS = [("linear", None), ("cat", None), ("svd", None), ("ties", 0.5), ("dare_linear", 0.5), ("dare_ties", 0.5),
           ("magnitude_prune", 0.5)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--counts", default="2,8,32", help="numbers of adapters to combine")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--tuned", help="a fully fine-tuned copy of the built-in model (default: make one: base + noise)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--extract-child", nargs=4, metavar=("BASE", "TUNED", "RANK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab, args.rank, args.counts, args.reps = 64, 2, 128, 500, 4, "2,4", 1
    args.counts = [int(c) for c in args.counts.split(",")]
    return args


def bench_model(args):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                        vocab_size=args.vocab, tie_word_embeddings=False)).eval()


def with_adapters(base, n, rank):
    """lorakit and PEFT copies of `base`, each with the same n random all-linear adapters."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    ours = copy.deepcopy(base)
    theirs = None
    for i in range(n):
        lorakit.inject(ours, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"), adapter=f"a{i}",
                       activate=False)
        config = PeftConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
        if theirs is None:
            theirs = get_peft_model(copy.deepcopy(base), config, adapter_name=f"a{i}")
        else:
            theirs.add_adapter(f"a{i}", config)
    g = torch.Generator().manual_seed(1)
    inner = theirs.base_model.model
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, lorakit.LoraLayer):
                peft_layer = inner.get_submodule(name)
                for i in range(n):
                    a = layer.adapters[f"a{i}"]
                    a.lora_B.normal_(std=0.02, generator=g)
                    peft_layer.lora_A[f"a{i}"].weight.copy_(a.lora_A)
                    peft_layer.lora_B[f"a{i}"].weight.copy_(a.lora_B)
    return ours, theirs


def combine_times(args):
    base = bench_model(args)
    rows = []
    for n in args.counts:
        ours, theirs = with_adapters(base, n, args.rank)
        names = [f"a{i}" for i in range(n)]
        weights = {name: 1.0 / n for name in names}
        for method, density in METHODS:
            calls = {"ours": 0, "peft": 0}

            def run_ours():
                calls["ours"] += 1
                lorakit.combine_adapters(ours, weights, method=method, density=density, name=f"c{calls['ours']}",
                                         activate=False)
                lorakit.delete_adapter(ours, f"c{calls['ours']}")

            def run_peft():
                calls["peft"] += 1
                theirs.add_weighted_adapter(names, list(weights.values()), f"c{calls['peft']}", combination_type=method,
                                            density=density)
                theirs.delete_adapter(f"c{calls['peft']}")

            t = interleaved({"ours": run_ours, "peft": run_peft}, args.reps, warmup=1)
            rows.append((n, method, t["ours"], t["peft"]))
            print(f"  combined {n} adapters by {method}: lorakit {fmt_time(median(t['ours'].wall))}, "
                  f"PEFT {fmt_time(median(t['peft'].wall))}", file=sys.stderr, flush=True)
    return rows


def mixture_forward(args, tmp: Path):
    """Forward of a 4-expert mixture (dense routing) against one adapter and the base, same batch."""
    base = bench_model(args)
    paths = {}
    for i in range(4):
        m = copy.deepcopy(base)
        lorakit.inject(m, lorakit.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
        paths[f"e{i}"] = str(lorakit.save_adapter(m, tmp / f"e{i}"))
    mixture = copy.deepcopy(base)
    lorakit.add_mixture(mixture, lorakit.MixtureConfig(experts=paths))
    single = copy.deepcopy(base)
    lorakit.load_adapter(single, paths["e0"])
    ids = torch.randint(0, args.vocab, (4, 256 if not args.quick else 32), generator=torch.Generator().manual_seed(2))

    def fwd(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids)
        return run

    return interleaved({"base": fwd(base), "single": fwd(single), "mixture": fwd(mixture)}, max(args.reps, 3))


def extract_child(base, tuned, rank, out) -> None:
    """Run in a fresh process so that its peak RSS is extract's own."""
    start = time.perf_counter()
    report = lorakit.extract_adapter(base, tuned, int(rank), out, progress=False)
    seconds = time.perf_counter() - start
    mean_energy = sum(r.energy_kept for r in report.layers) / len(report.layers)
    print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "layers": len(report.layers), "energy": mean_energy}))


def extract_runs(args, tmp: Path):
    from lorakit.train.builtin import default_model_dir

    base = default_model_dir()
    tuned = Path(args.tuned) if args.tuned else make_tuned_copy(base, tmp / "tuned")
    weights = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    results = []
    for rank in (8, 64):
        out = subprocess.run([sys.executable, __file__, "--extract-child", str(base), str(tuned), str(rank), str(tmp / f"x{rank}")],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results.append((rank, json.loads(out.stdout.strip().splitlines()[-1])))
    return weights, tuned, results


def make_tuned_copy(base: Path, out: Path) -> Path:
    """A stand-in fine-tune: every weight plus small noise (full rank), saved as its own model directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.01)
    model.save_pretrained(out)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.extract_child:
        extract_child(*args.extract_child)
        return 0
    print(f"# bench/compose.py  {time.strftime('%Y-%m-%d %H:%M')}, 1 thread, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"bench model: Llama hidden {args.hidden} x {args.layers} layers (intermediate {args.intermediate}), "
          f"all-linear r={args.rank} adapters\n")
    print("| adapters | method | lorakit | PEFT | lorakit ÷ PEFT (paired) |\n| --- | --- | --- | --- | --- |")
    for n, method, ours, peft in combine_times(args):
        print(f"| {n} | {method} | {fmt_time(median(ours.wall))} | {fmt_time(median(peft.wall))} "
              f"| {paired_ratio(ours.wall, peft.wall):.3f}× |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = mixture_forward(args, Path(tmp))
        print("\n| forward (batch 4 × 256) | time | ÷ base | ÷ one adapter |\n| --- | --- | --- | --- |")
        for k in ("base", "single", "mixture"):
            print(f"| {k} | {fmt_time(median(t[k].wall))} | {paired_ratio(t[k].wall, t['base'].wall):.3f}× "
                  f"| {paired_ratio(t[k].wall, t['single'].wall):.3f}× |")
        if not args.skip_extract:
            weights, tuned, results = extract_runs(args, Path(tmp))
            print(f"\nextract from the built-in model ({weights / 2**20:.0f} MiB of weights per checkpoint) against "
                  f"{'a fine-tuned copy' if args.tuned else 'base + 1% noise on every weight'} ({tuned}):\n")
            print("| rank | layers | time | peak RSS | ÷ one checkpoint's weights | mean energy kept |\n| --- | --- | --- | --- | --- | --- |")
            for rank, r in results:
                print(f"| {rank} | {r['layers']} | {r['seconds']:.1f} s | {r['peak_rss'] / 2**20:.0f} MiB "
                      f"| {r['peak_rss'] / weights:.2f}× | {r['energy']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
