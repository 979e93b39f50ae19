"""Server benchmark (issues 4, 12): `lorakit serve` over loopback HTTP with N concurrent clients and mixed adapters.

    python bench/serve_http.py               # Llama hidden 512, 8 layers; 1, 4, 16 clients (~4 min on 2 cores)
    python bench/serve_http.py --compare-src /tmp/old   # also an older lorakit (its src/ there), same run, in turn
    python bench/serve_http.py --quick       # a tiny model, to check the script runs (~30 s)

The server runs in its own process (`python -m lorakit serve`), as a user would start it; each client
thread sends streamed completions one after another, cycling through the base and three adapters of ranks
8, 16 and 32. Per level: generated tokens per second over the level's wall time, each request's time to
first token (TTFT: send to the first streamed chunk) and latency (send to the last byte) at p50 and p99.
Each level is bounded by a request count and a time limit. Before and after the levels, the bench process
itself runs a plain `model.generate` of the base at batch `--max-batch` (same prompt and output lengths,
same threads) while the server idles: the server's tokens/s at the highest level is reported against it.
The table is printed and appended to docs/benchmarks.md under "Server (bench/serve_http.py)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
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

import lorakit  # noqa: E402
from docs_section import add_to_section  # noqa: E402

HEADING = "## Server (bench/serve_http.py)"
ADAPTER_RANKS = {"r8": 8, "r16": 16, "r32": 32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per level at most")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most (requests in flight finish)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server (0: torch's default)")
    p.add_argument("--compare-src", default=None, metavar="DIR",
                   help="also run the server of another lorakit checkout (DIR/src), level by level in turn")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    p.add_argument("--quick", action="store_true", help="a tiny model and few requests: checks the script, not the speed")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.requests, args.max_tokens = 64, 2, 500, 8, 8
        args.clients = "1,4"
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


def build(root: Path, args) -> None:
    """A config-built Llama with a word-level tokenizer, and one adapter per rank, all saved under `root`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=max(4, args.hidden // 64), num_key_value_heads=max(2, args.hidden // 128),
                         vocab_size=args.vocab, max_position_embeddings=args.prompt_tokens + args.max_tokens + 16,
                         eos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, args.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>").save_pretrained(root / "base")
    for i, (name, rank) in enumerate(ADAPTER_RANKS.items()):
        model = LlamaForCausalLM.from_pretrained(root / "base")
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        lorakit.save_adapter(model, root / "adapters" / name)


def start_server(root: Path, args, src: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lorakit", "serve", "--base", str(root / "base"), "--name", "base", "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(max(args.clients) * 2),
           "--adapters", *[f"{n}={root / 'adapters' / n}" for n in ADAPTER_RANKS]]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(src) / "src")} if src else None
    return launch(cmd, port, root / f"server{'-' + Path(src).name if src else ''}.log", env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], port: int, log: Path, env=None, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Start `lorakit serve` (cmd) and wait until /health answers; its log goes to a file, not a pipe (a full pipe
    would stall the server's access log)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start within {timeout:.0f} s")


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def run_level(url: str, clients: int, args) -> dict:
    models = ["base", *ADAPTER_RANKS]
    g = torch.Generator().manual_seed(clients)
    bodies = [{"model": models[i % len(models)], "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True},
               "prompt": torch.randint(1, args.vocab, (args.prompt_tokens,), generator=g).tolist()}
              for i in range(args.requests)]
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens, errors, issued = [0], [], [0]
    lock = threading.Lock()
    https = [httpx.Client(base_url=url, timeout=300) for _ in range(clients)]  # connections made before the clock
    ready = threading.Barrier(clients + 1)

    def client_loop(http: httpx.Client) -> None:
        ready.wait()
        while True:
            with lock:
                if issued[0] >= len(bodies) or time.perf_counter() - start > args.time_limit:
                    return
                body = bodies[issued[0]]
                issued[0] += 1
            t0 = time.perf_counter()
            first, usage = None, None
            with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    with lock:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                for line in r.iter_lines():
                    if line.startswith("data: {") and first is None:
                        first = time.perf_counter() - t0
                    if line.startswith("data: {") and '"usage"' in line:
                        usage = json.loads(line[6:]).get("usage")
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                ttfts.append(first if first is not None else dt)
                tokens[0] += usage["completion_tokens"] if usage else 0

    with httpx.Client(base_url=url) as http:
        for c in https:
            c.get("/health")
        steps0, rows0 = metric(http, "lorakit_decode_steps_total"), metric(http, "lorakit_decode_rows_total")
        threads = [threading.Thread(target=client_loop, args=(c,)) for c in https]
        for t in threads:
            t.start()
        start = time.perf_counter()
        ready.wait()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        steps, rows = metric(http, "lorakit_decode_steps_total") - steps0, metric(http, "lorakit_decode_rows_total") - rows0
    for c in https:
        c.close()
    if errors:
        print(f"  {len(errors)} failed requests, e.g. {errors[0]}", file=sys.stderr)
    return {"clients": clients, "requests": len(latencies), "tokens": tokens[0], "wall": wall,
            "tok_s": tokens[0] / wall, "p50": _pct(latencies, 50), "p99": _pct(latencies, 99),
            "ttft50": _pct(ttfts, 50), "ttft99": _pct(ttfts, 99),
            "mean_batch": rows / steps if steps else 0.0, "errors": len(errors)}


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))] if v else float("nan")


def plain_generate(root: Path, args, repeats: int = 3) -> float:
    """Tokens/s of `model.generate` on the base at batch max_batch (greedy, the bench's prompt and output lengths)."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = LlamaForCausalLM.from_pretrained(root / "base").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, args.vocab, (args.max_batch, args.prompt_tokens), generator=g)
    kw = dict(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    best = []
    with torch.no_grad():
        model.generate(ids[:, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2, "attention_mask": torch.ones_like(ids[:, :8])})
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            best.append((out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - t0))
    return statistics.median(best)


def prefill_floor(root: Path, args, repeats: int = 5) -> tuple[float, int]:
    """The least compute time before the median request of a burst of max(clients) simultaneous prompts can have its
    first token: its half of the burst prefilled, in the best grouping, with the bench's adapters per row, in the
    bench process at the server's threads (HTTP, sampling and the other requests' decode steps not counted).
    Returns (seconds, group size)."""
    from transformers import DynamicCache, LlamaForCausalLM

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = LlamaForCausalLM.from_pretrained(root / "base").eval()
    for name in ADAPTER_RANKS:
        lorakit.load_adapter(model, root / "adapters" / name, adapter=name)
    names = [None, *ADAPTER_RANKS] * max(args.clients)
    half = -(-max(args.clients) // 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, args.vocab, (half, args.prompt_tokens), generator=g)
    groups = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= half]

    def forward(k: int) -> float:
        with torch.inference_mode(), lorakit.adapter_rows(model, names[:k]):
            t0 = time.perf_counter()
            model(ids[:k], past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0

    times: dict[int, list[float]] = {k: [] for k in groups}
    for k in groups:
        forward(k)
    for _ in range(repeats):  # the group sizes in turn
        for k in groups:
            times[k].append(forward(k))
    best = min(groups, key=lambda k: -(-half // k) * statistics.median(times[k]))
    return -(-half // best) * statistics.median(times[best]), best


def table(results: dict[str, list[dict]], args, generate: list[float]) -> str:
    gen = statistics.mean(generate)
    lines = [
        f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; adapters r=8/16/32 (all-linear) and the "
        f"base in turn; prompt {args.prompt_tokens} tokens, {args.max_tokens} generated (greedy, streamed); max batch "
        f"{args.max_batch}; server with {args.threads or 'default'} torch thread(s); clients in another process on the "
        f"same machine; {platform.machine()}, {os.cpu_count()} CPUs (load average {args.load:.1f} from other work at the "
        f"start), torch {torch.__version__}; {time.strftime('%Y-%m-%d')}. Plain `generate` of the base at batch "
        f"{args.max_batch} in the bench process: {gen:.1f} tokens/s (before and after the levels: "
        f"{', '.join(f'{g:.1f}' for g in generate)}).",
        "",
        "| server | clients | requests | tokens/s | × generate | p50 TTFT (s) | p99 TTFT (s) | p50 latency (s) | p99 latency (s) | mean decode batch | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['tok_s'] / gen:.2f} | "
                         f"{r['ttft50']:.3f} | {r['ttft99']:.3f} | {r['p50']:.3f} | {r['p99']:.3f} | "
                         f"{r['mean_batch']:.2f} | {r['errors']} |")
    floor, group = args.floor
    top = max(args.clients)
    lines += ["", f"Compute floor of p50 TTFT at {top} clients (a burst of {top} prompts): prefilling the median "
              f"request's half of the burst, in the best grouping (groups of {group}), with the bench's adapters per "
              f"row, takes {floor:.3f} s here (`prefill_floor`; HTTP, sampling and decode steps not counted)."]
    older = [rows for name, rows in results.items() if name != "this lorakit"]
    if older:
        old50 = next(r["ttft50"] for r in older[0] if r["clients"] == top)
        ours = next(r["ttft50"] for r in results["this lorakit"] if r["clients"] == top)
        lines.append(f"At {top} clients: p50 TTFT {ours / old50:.2f}× the older server's (target ≤ 0.5×, i.e. "
                     f"{0.5 * old50:.3f} s; the floor is {floor / old50:.2f}× it); tokens/s "
                     f"{results['this lorakit'][-1]['tok_s'] / gen:.2f}× plain `generate` (target ≥ 0.90×).")
    return "\n".join(lines)



def main(argv=None) -> int:
    args = parse_args(argv)
    args.load = os.getloadavg()[0]
    servers = {"this lorakit": None}
    if args.compare_src:
        servers[f"{Path(args.compare_src).name} (older)"] = args.compare_src
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args)
        generate = [plain_generate(root, args)]
        print(f"plain generate at batch {args.max_batch}: {generate[0]:.1f} tok/s", flush=True)
        procs = {name: start_server(root, args, src) for name, src in servers.items()}
        try:
            for _, url in procs.values():
                run_level(url, 1, argparse.Namespace(**{**vars(args), "requests": 2}))  # warm-up
            results: dict[str, list[dict]] = {name: [] for name in servers}
            for clients in args.clients:
                for name, (_, url) in procs.items():  # level by level, the servers in turn (each idles meanwhile)
                    r = run_level(url, clients, args)
                    print(f"{name}: {clients:3d} clients: {r['requests']} requests, {r['tok_s']:.1f} tok/s, TTFT p50 "
                          f"{r['ttft50']:.3f} s, p50 {r['p50']:.3f} s, p99 {r['p99']:.3f} s, mean batch "
                          f"{r['mean_batch']:.2f}", flush=True)
                    results[name].append(r)
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(30)
        generate.append(plain_generate(root, args))
        args.floor = prefill_floor(root, args)
    text = table(results, args, generate)
    print("\n" + text)
    if not args.no_write and not args.quick:
        intro = "`python bench/serve_http.py`: throughput and latency of `lorakit serve` under concurrent clients over loopback HTTP."
        print(f"\nadded to {add_to_section(HEADING, intro, text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
