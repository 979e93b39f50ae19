"""Is the memory planner honest? Predicted (`lorakit.plan_memory`) vs measured peak memory of real training steps.

For full fine-tuning, LoRA (lorakit) and QLoRA, with and without gradient checkpointing, each run in a fresh
process so peaks do not mix. Measured on CPU: the peak RSS of the training steps (`VmHWM`, reset through
/proc/self/clear_refs after the model is loaded) minus the RSS of the same process before the model existed
(Python, torch, transformers: what the planner leaves out); on CUDA: torch.cuda.max_memory_allocated().
    python bench/memory.py                  # SmolLM2-135M's architecture (random weights), batch 4 x 256, ~10 min
    python bench/memory.py --size small     # a small Llama, for a smoke test (~1 min)
    python bench/memory.py --model DIR      # a real model directory instead (e.g. the built-in SmolLM2)

QLoRA: lorakit's own 4-bit path is not built yet, so the QLoRA rows measure PEFT + bitsandbytes QLoRA
(NF4, double quantisation) with the same LoRA setting. When `lorakit.load_base_model(..., quantize="nf4")`
lands, set QLORA_IMPL = "lorakit" (see load_qlora) to measure lorakit's path instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
# freed tensors stay in the heap and RSS keeps them: measured here, +30 to +160 MiB over the live tensors
# on a 7M-parameter model. A fixed threshold keeps every tensor over 64 KiB in its own mapping, returned to
# the system when freed, so RSS follows the live tensors (what torch.cuda.max_memory_allocated reports).
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
QLORA_IMPL = "peft"  # "lorakit" once lorakit's NF4 base lands (issue 8, item 1)
METHODS = ("full", "lora", "qlora")
RANK, TARGETS = 16, "all-linear"
SIZES = {
    # SmolLM2-135M's architecture (the built-in model), with random weights: no file needed, same shapes.
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=8000, tie_word_embeddings=False),
    # Run once per process before the baseline is read, so lazy imports and kernel set-up are not counted.
    "warmup": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False),
}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so the peak is the training steps' own."""
    Path("/proc/self/clear_refs").write_text("5")


def load_full_or_lora(base: Path, method: str):
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if method == "lora":
        lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=TARGETS))
    return model


def load_qlora(base: Path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if QLORA_IMPL == "lorakit":  # the one-line switch, once lorakit's 4-bit path exists
        import lorakit

        model = lorakit.load_base_model(base, quantize="nf4")
        return lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=TARGETS))
    from peft import LoraConfig, get_peft_model

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS))


def stored_4bit_bytes(model) -> int:
    """Bytes the 4-bit linear layers really hold: packed codes plus every quantisation constant."""
    total, seen = 0, set()
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is None or id(m.weight) in seen:  # PEFT's wrapper exposes its base layer's weight too
            continue
        seen.add(id(m.weight))
        tensors = [m.weight.data, qs.absmax, qs.code]
        if qs.nested:
            tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
        total += sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "numel"))
    return total


def prepare(method: str, ckpt: bool, base: Path, device: str):
    """The model (as the method trains it) and its AdamW over the trainable parameters."""
    import torch

    model = load_qlora(base) if method == "qlora" else load_full_or_lora(base, method)
    if device == "cuda" and method != "qlora":
        model.to(device)
    if ckpt:
        model.gradient_checkpointing_enable()  # non-reentrant: no input that requires grad is needed
    model.config.use_cache = False
    model.train()
    own_memory(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def own_memory(model) -> None:
    """Copy every parameter and buffer that is still a view of the mapped safetensors file into memory of its own.

    from_pretrained maps the file and leaves unconverted tensors as views of it; the pages it read stay in
    RSS while any view lives. For QLoRA that is the whole fp32 file (read once to quantise, then unused:
    +442 MiB measured here on SmolLM2-135M) kept mapped by the unquantised embedding and norms. On a GPU the
    weights are copied to the device anyway; this does the same on the CPU, so RSS counts the model's own state.
    """
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if type(p) is torch.nn.Parameter:  # not bitsandbytes' Params4bit: its data is already its own
                p.data = p.data.clone()
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.clone()


def train_steps(model, opt, batch: int, seq: int, steps: int, device: str) -> list[float]:
    import torch

    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        del loss
    return times


def child(method: str, ckpt: bool, base: Path, batch: int, seq: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # The same pipeline once on a one-block model: imports, kernels and thread pools are then in the
    # baseline, which is what the planner leaves out ("the framework itself").
    model, opt = prepare(method, ckpt, base.parent / "warmup", device)
    train_steps(model, opt, 2, 16, 2, device)
    del model, opt
    gc.collect()
    base_rss = rss_kib("VmRSS") * 1024
    model, opt = prepare(method, ckpt, base, device)
    gc.collect()
    loaded = rss_kib("VmRSS") * 1024 - base_rss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    reset_peak()
    times = train_steps(model, opt, batch, seq, steps, device)
    peak = torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024 - base_rss
    result = {"peak": peak, "loaded": loaded, "step_s": min(times), "device": device}
    if method == "qlora":
        result["stored_4bit"] = stored_4bit_bytes(model)
        model.eval()  # one no-grad forward: bitsandbytes may repack the 4-bit weights on this CPU
        try:
            with torch.no_grad():
                model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device))
            result["stored_4bit_after_eval"] = stored_4bit_bytes(model)
        except AssertionError as e:  # bitsandbytes 0.50's CPU repack needs out_features divisible by 32
            result["stored_4bit_after_eval"] = f"eval forward failed in bitsandbytes: {e}"
    return result


def make_model(root: Path, size: str, name: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SIZES[size], max_position_embeddings=2048))
    path = root / name
    model.save_pretrained(path)
    return path


def predict(base: Path, method: str, ckpt: bool, batch: int, seq: int, device: str):
    import lorakit

    plan = lorakit.plan_memory(base, method=method, rank=RANK, targets=TARGETS, batch=batch, seq=seq,
                               gradient_checkpointing=ckpt, dtype="fp32", device=device, serve_adapters=0)
    return plan.methods[method], plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=list(SIZES), default="smollm2")
    ap.add_argument("--model", help="a model directory to measure instead of a config-built one")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--child", choices=METHODS)
    ap.add_argument("--ckpt", type=int, default=0)
    ap.add_argument("--base")
    args = ap.parse_args()
    if args.child:
        res = child(args.child, bool(args.ckpt), Path(args.base), args.batch, args.seq, args.steps)
        print("RESULT " + json.dumps(res))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_model(Path(tmp), "warmup", "warmup")
        base = make_model(Path(tmp), args.size, "base")
        if args.model:  # measure a real directory: link it beside the warm-up model
            base = Path(tmp) / "model"
            base.symlink_to(Path(args.model).resolve())
        rows = []
        for method in args.methods:
            for ckpt in (False, True):
                cmd = [sys.executable, __file__, "--child", method, "--ckpt", str(int(ckpt)), "--base", str(base),
                       "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
                if proc.returncode != 0:
                    sys.exit(f"{method} child failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.split("RESULT ", 1)[1])
                pred, plan = predict(base, method, ckpt, args.batch, args.seq, res["device"])
                rows.append((method, ckpt, pred, res))
                print(f"{method} ckpt={ckpt}: measured {res['peak'] / 2**20:,.0f} MiB, "
                      f"predicted {pred.peak / 2**20:,.0f} MiB ({res['step_s']:.1f} s/step)", file=sys.stderr, flush=True)
        report(rows, plan, args)


def report(rows, plan, args) -> None:
    mib = 2**20
    print(f"\npeak memory of {args.steps} training steps, {args.model or 'Llama ' + args.size + ' (random weights)'}, "
          f"{plan.base.total:,} params, fp32, batch {args.batch} x {args.seq}, LoRA r={RANK} {TARGETS}, AdamW, "
          f"1 thread, {rows[0][3]['device']}")
    print("| method | checkpointing | predicted peak MiB | measured MiB | predicted / measured | s/step | peak at (plan) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    worst = 0.0
    for method, ckpt, pred, res in rows:
        ratio = pred.peak / res["peak"]
        worst = max(worst, abs(ratio - 1))
        name = {"full": "full FT", "lora": "LoRA (lorakit)", "qlora": f"QLoRA ({QLORA_IMPL})"}[method]
        print(f"| {name} | {'on' if ckpt else 'off'} | {pred.peak / mib:,.0f} | {res['peak'] / mib:,.0f} | {ratio:.3f} | "
              f"{res['step_s']:.1f} | {pred.peak_at} |")
    for method, ckpt, pred, res in rows:
        if method == "qlora" and not ckpt:
            from lorakit.plan.storage import nf4_bytes

            std = sum(nf4_bytes(o, i) for o, i in plan.base.linear_shapes)
            packed = sum(nf4_bytes(o, i, cpu_packed=True) for o, i in plan.base.linear_shapes)
            after = res["stored_4bit_after_eval"]
            print(f"\n4-bit linear weights stored: {res['stored_4bit']:,} B measured, {std:,} B predicted (NF4 + double quant); "
                  f"after one eval forward: {after if isinstance(after, str) else format(after, ',') + ' B'} measured, "
                  f"{packed:,} B predicted if repacked")
    print(f"\nworst |predicted/measured - 1| = {worst:.3f} (target <= 0.15) -> {'met' if worst <= 0.15 else 'NOT met'}")


if __name__ == "__main__":
    main()
