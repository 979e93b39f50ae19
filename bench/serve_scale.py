"""Serving at scale (issue 12): adapter loads at constant cost, decode steps that loads do not stall, and throughput
flat in the number of adapters in traffic.

    python bench/serve_scale.py                    # all three parts (~10 min on 2 shared cores)
    python bench/serve_scale.py --parts traffic    # one part: loads, stall, traffic
    python bench/serve_scale.py --quick            # small sizes, to check the script runs (~1 min)

loads    `lorakit.load_adapter` of the same 2.5 MB adapter (Llama hidden 512 × 4 layers, all-linear r=16, the
         issue's setting) N times into one model: each load's time (median of the 5 around the 5th vs around the
         N-th; target ≤ 1.5×) and resident memory per loaded adapter against its tensor bytes.
stall    The engine (no HTTP) decoding 16 rows non-stop on that model while a helper thread loads 100 adapters
         through the store: the time between consecutive decode steps, p50/p99, idle windows and loading windows in
         turn (target: loading p99 ≤ 1.3× idle p99).
traffic  `lorakit serve` in its own process (small Llama hidden 256 × 4 layers, all-linear r=8 adapters) with 1, 32,
         256 and 1,000 adapters registered from one root, 16 clients sending requests spread uniformly or Zipf (s=1)
         over them: once cold (adapters load on first use, during the row), then warm (all loaded), in turn over
         the levels. Tokens/s against the 1-adapter level (target at 1,000: ≥ 0.85×).
Everything runs with 1 torch thread per process (the machine has 2 cores shared with other work).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lorakit  # noqa: E402
from serve_http import free_port, launch  # noqa: E402  (bench/ is on the path when run as a script)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="loads,stall,traffic")
    p.add_argument("--loads", type=int, default=500, help="adapters loaded in the loads part")
    p.add_argument("--stall-adapters", type=int, default=100)
    p.add_argument("--levels", default="1,32,256,1000", help="registered adapters per traffic level")
    p.add_argument("--requests", type=int, default=96, help="requests per traffic level and distribution")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="warm traffic rows per level, taken in turn")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.loads, args.stall_adapters, args.levels, args.requests, args.rounds = 40, 12, "1,8,40", 24, 1
    args.parts = args.parts.split(",")
    args.levels = [int(x) for x in args.levels.split(",")]
    return args


def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def issue_model() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512, eos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def save_adapters(base, root: Path, n: int, rank: int, seed: int = 0) -> list[Path]:
    """n adapters with random non-zero factors (one model, re-randomised and saved n times)."""
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    paths = []
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        paths.append(lorakit.save_adapter(model, root / f"a{i:04d}"))
    return paths


# --- loads ------------------------------------------------------------------------------------------


def part_loads(args, tmp: Path) -> list[str]:
    base = issue_model()
    path = save_adapters(base, tmp / "one", 1, 16)[0]
    file_bytes = (path / "adapter_model.safetensors").stat().st_size
    tensor_bytes = sum(t.numel() * t.element_size() for t in lorakit.io.read_adapter_tensors(path).values())
    times = []
    before = rss()
    for i in range(args.loads):
        t0 = time.perf_counter()
        lorakit.load_adapter(base, path, adapter=f"a{i}", activate=False)
        times.append(time.perf_counter() - t0)
    per_adapter = (rss() - before) / args.loads
    early, late = statistics.median(times[2:7]), statistics.median(times[-5:])
    delete = []
    for i in range(0, args.loads, 10):
        t0 = time.perf_counter()
        lorakit.delete_adapter(base, f"a{i}")
        delete.append(time.perf_counter() - t0)
    return [
        f"Loads: {args.loads} × `load_adapter` of one {file_bytes / 1e6:.2f} MB adapter ({tensor_bytes / 1e6:.2f} MB of "
        "tensors; Llama hidden 512 × 4 layers, all-linear r=16) into one model.",
        "",
        "| what | value |",
        "| --- | ---: |",
        f"| load around the 5th (median of 5) | {early * 1e3:.1f} ms |",
        f"| load around the {args.loads}th (median of 5) | {late * 1e3:.1f} ms |",
        f"| {args.loads}th ÷ 5th (target ≤ 1.5) | {late / early:.2f} |",
        f"| mean load, all {args.loads} | {statistics.mean(times) * 1e3:.1f} ms |",
        f"| delete (median, with {args.loads} loaded) | {statistics.median(delete) * 1e3:.1f} ms |",
        f"| resident memory per loaded adapter ÷ its tensor bytes | {per_adapter / tensor_bytes:.2f} |",
    ]


# --- stall ------------------------------------------------------------------------------------------


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def part_stall(args, tmp: Path) -> list[str]:
    from lorakit.serve.engine import Engine, Job
    from lorakit.serve.sampling import SamplingParams
    from lorakit.serve.store import AdapterStore

    base = issue_model()
    paths = save_adapters(base, tmp / "stall", args.stall_adapters + 3, 16, seed=1)
    engine = Engine(base, _Tokenizer(), max_batch=16, max_queue=64, eos_token_ids=set())
    store = AdapterStore(base, root=tmp / "stall", model_lock=engine.model_lock)
    for p in paths:
        store.register(p.name, p.name)
    engine.adapters = store
    ends: list[float] = []
    decode = engine._decode

    def timed_decode():
        decode()
        ends.append(time.perf_counter())

    engine._decode = timed_decode
    g = torch.Generator().manual_seed(0)
    stopping = False

    def submit(i):  # 16 rows on three adapters, each replaced by a new one when it ends: the batch never drains
        prompt = torch.randint(1, 32000, (32,), generator=g).tolist()

        def on_event(event):
            if event.finish_reason and not stopping:
                submit(i)

        engine.submit(Job(prompt, SamplingParams(max_tokens=400, temperature=0), on_event, paths[i % 3].name))

    engine.start()
    for i in range(16):
        submit(i)
    while len(ends) < 20:
        time.sleep(0.05)

    def intervals(work) -> list[float]:
        start = len(ends)
        work()
        return [b - a for a, b in zip(ends[start:-1], ends[start + 1:])]

    def idle():
        target = len(ends) + 40
        while len(ends) < target:
            time.sleep(0.02)

    to_load = paths[3:]
    half = len(to_load) // 2
    idle_steps, loading_steps = intervals(idle), []
    for chunk in (to_load[:half], to_load[half:]):
        loading_steps += intervals(lambda c=chunk: [store.release(store.acquire(p.name)) for p in c])
        idle_steps += intervals(idle)
    stopping = True
    engine.stop(timeout=30)

    def pct(v, q):
        v = sorted(v)
        return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]

    return [
        f"Stall: the engine decoding 16 rows (three adapters, the issue's model) while another thread loads "
        f"{len(to_load)} more adapters (2.5 MB each) through the store, in two loading windows between three idle "
        "ones. Time between consecutive decode steps:",
        "",
        "| window | steps | p50 (ms) | p99 (ms) |",
        "| --- | ---: | ---: | ---: |",
        f"| idle | {len(idle_steps)} | {pct(idle_steps, 50) * 1e3:.1f} | {pct(idle_steps, 99) * 1e3:.1f} |",
        f"| loading | {len(loading_steps)} | {pct(loading_steps, 50) * 1e3:.1f} | {pct(loading_steps, 99) * 1e3:.1f} |",
        f"| loading ÷ idle (target p99 ≤ 1.3) | | {pct(loading_steps, 50) / pct(idle_steps, 50):.2f} | "
        f"{pct(loading_steps, 99) / pct(idle_steps, 99):.2f} |",
    ]


# --- traffic ----------------------------------------------------------------------------------------


def build_small(root: Path, n: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=4000, max_position_embeddings=128, eos_token_id=None)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 4000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>").save_pretrained(root / "base")
    save_adapters(base, root / "adapters", n, 8, seed=2)


def start_server(root: Path, registered: int) -> tuple[subprocess.Popen, str]:
    reg = root / f"reg{registered}"  # a root holding exactly `registered` adapters (hard links to the saved ones)
    reg.mkdir(exist_ok=True)
    for i in range(registered):
        link = reg / f"a{i:04d}"
        if not link.exists():
            link.mkdir()
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                os.link(root / "adapters" / f"a{i:04d}" / f, link / f)
    port = free_port()
    cmd = [sys.executable, "-m", "lorakit", "serve", "--base", str(root / "base"), "--name", "base", "--port", str(port),
           "--adapter-root", str(reg), "--register-all", "--max-batch", "16", "--max-queue", "64", "--threads", "1"]
    return launch(cmd, port, root / f"server{registered}.log")


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def run_traffic(url: str, names: list[str], args, dist: str, seed: int) -> dict:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(len(names))] if dist == "zipf" else None
    bodies = [{"model": rng.choices(names, weights)[0] if weights else rng.choice(names), "max_tokens": 16,
               "temperature": 0, "prompt": [rng.randrange(1, 4000) for _ in range(16)]} for _ in range(args.requests)]
    tokens, issued, errors = [0], [0], []
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    if issued[0] >= len(bodies):
                        return
                    body = bodies[issued[0]]
                    issued[0] += 1
                r = http.post("/v1/completions", json=body)
                with lock:
                    if r.status_code == 200:
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        errors.append(r.text[:200])

    loads0 = metric(url, "lorakit_adapter_loads_total")
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        print(f"  {len(errors)} errors, e.g. {errors[0]}", file=sys.stderr)
    return {"tok_s": tokens[0] / wall, "loads": metric(url, "lorakit_adapter_loads_total") - loads0,
            "distinct": len({b["model"] for b in bodies}), "errors": len(errors)}


def part_traffic(args, tmp: Path) -> list[str]:
    """All levels' servers run at once (idle but for the one measured); warm rows are taken in turn over the levels,
    `--rounds` times, and the median kept: on a shared machine, load drifts more than the levels differ."""
    build_small(tmp, max(args.levels))
    servers = {n: start_server(tmp, n) for n in args.levels}
    names = {n: [f"a{i:04d}" for i in range(n)] for n in args.levels}
    cold, warm = {}, {(n, d): [] for n in args.levels for d in ("uniform", "zipf")}
    try:
        for n, (_, url) in servers.items():
            run_traffic(url, names[n][:1], argparse.Namespace(**{**vars(args), "requests": 8}), "uniform", 0)  # warm-up
            for dist in ("uniform", "zipf"):  # adapters load on first use, during the row
                cold[(n, dist)] = run_traffic(url, names[n], args, dist, seed=n)
                print(f"traffic: {n} adapters, {dist}, cold: {cold[(n, dist)]['tok_s']:.1f} tok/s "
                      f"({cold[(n, dist)]['loads']:.0f} loads)", file=sys.stderr, flush=True)
        for _ in range(args.rounds):
            for n, (_, url) in servers.items():
                for dist in ("uniform", "zipf"):  # the same requests again: every adapter loaded
                    warm[(n, dist)].append(run_traffic(url, names[n], args, dist, seed=n)["tok_s"])
            print(f"traffic: warm round: {[f'{v[-1]:.0f}' for v in warm.values()]}", file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    first = args.levels[0]
    med = {k: statistics.median(v) for k, v in warm.items()}
    lines = [
        f"Traffic: `lorakit serve` (Llama hidden 256 × 4 layers, vocab 4000; all-linear r=8 adapters; 1 torch thread) "
        f"with N adapters registered from one root (`--adapter-root --register-all`, no cap on loaded adapters), "
        f"{args.clients} clients, {args.requests} requests per row (prompt 16 tokens, 16 generated, greedy). Cold: the "
        "adapters load on first use, during the row (from disk: read, check, build, copy into slots), one row per "
        f"level; warm: the same requests again with every adapter loaded (what S-LoRA measures: adapters in memory), "
        f"median of {args.rounds} rows taken in turn over the levels.",
        "",
        "| registered | requests spread | distinct adapters used | loads (cold) | tokens/s cold | × 1 adapter | tokens/s warm (median) | × 1 adapter |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (n, dist), r in cold.items():
        ref = cold[(first, dist)]["tok_s"]
        lines.append(f"| {n} | {dist} | {r['distinct']} | {r['loads']:.0f} | {r['tok_s']:.1f} | {r['tok_s'] / ref:.2f} | "
                     f"{med[(n, dist)]:.1f} | {med[(n, dist)] / med[(first, dist)]:.2f} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPUs shared with other "
              f"work (load average {os.getloadavg()[0]:.1f} at the start), torch {torch.__version__}, 1 thread per process.")
    out = [header, ""]
    parts = {"loads": part_loads, "stall": part_stall, "traffic": part_traffic}
    for name in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            lines = parts[name](args, Path(tmp))
        print("\n".join(lines) + "\n", flush=True)
        out += lines + [""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
