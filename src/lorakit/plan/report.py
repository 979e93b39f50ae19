"""A memory plan as a readable table: one column per method, one row per part."""

from __future__ import annotations

_TITLES = {"full": "full FT", "lora": "LoRA", "qlora": "QLoRA"}
_ROWS = (("weights", "weights (base)"), ("adapter", "adapter"), ("gradients", "gradients"),
         ("optimizer", "optimizer states"), ("activations", "activations (saved)"), ("temporaries", "temporaries at peak"))
_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def human(n: int) -> str:
    """Bytes in binary units, three significant digits."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{n} B"


def format_plan(plan) -> str:
    """`plan`: a lorakit.plan.MemoryPlan (not imported here: planner.py imports this module to format itself)."""
    dtype = _DTYPE_NAMES.get(str(plan.dtype), str(plan.dtype))
    leaves = list(dict.fromkeys(a.leaf for a in plan.adapter.modules))
    ad = plan.adapter
    lines = [
        f"model: {plan.model_type}, {plan.base.total:,} parameters, {dtype}",
        f"LoRA: r={plan.lora.r}, alpha={plan.lora.alpha:g}, on {', '.join(leaves)} ({len(ad.modules)} modules)",
        f"trainable params: {ad.trainable:,} || all params: {ad.total:,} || trainable%: {ad.percent:.4f}",
        f"step: batch {plan.batch} x {plan.seq} tokens, {plan.optim}, gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}, {plan.device}",
        "",
    ]
    cols = list(plan.methods.values())
    width = 13
    lines.append(f"{'training memory':24}" + "".join(f"{_TITLES[c.method]:>{width}}" for c in cols))
    lines.append(f"{'  trainable params':24}" + "".join(f"{c.trainable:>{width},}" for c in cols))
    for attr, title in _ROWS:
        lines.append(f"{'  ' + title:24}" + "".join(f"{_cell(getattr(c, attr)):>{width}}" for c in cols))
    lines.append(f"{'  peak':24}" + "".join(f"{human(c.peak):>{width}}" for c in cols))
    lines.append(f"{'  peak is at':24}" + "".join(f"{c.peak_at:>{width}}" for c in cols))
    lines.append("  peak = weights + adapter + optimizer + (activations or gradients, whichever moment is fuller) + temporaries:")
    lines.append("  zero_grad(set_to_none=True) frees gradients after each step, and backward frees activations as it goes")
    s = plan.serving
    if s.adapters:
        lines += ["", f"serving {s.adapters} adapters ({human(s.adapter_each)} each)",
                  f"  one {dtype} base + {s.adapters} adapters   {human(s.shared):>10}",
                  f"  one NF4 base + {s.adapters} adapters    {human(s.shared_4bit):>10}",
                  f"  {s.adapters} merged {dtype} copies        {human(s.merged):>10}"]
    lines += [""] + [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _cell(n: int) -> str:
    return "-" if n == 0 else human(n)
