"""The memory side of a recommendation: the cheapest change that makes a training step fit the memory asked for,
from lorakit's memory plan (the model's config on the meta device: nothing is loaded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import MemoryPlan, plan_memory, replan
from ..plan.report import human

HEADROOM = 0.9  # the plan leaves out the framework (CUDA context, allocator slack): keep 10% of the memory for it
MICRO_BATCHES = (16, 8, 4, 2, 1)


@dataclass(frozen=True)
class Rung:
    """One setup on the way from the fastest to the smallest: what trains, checkpointing, optimizer."""

    method: str  # a column of the plan: "full", "lora" or "qlora"
    checkpointing: bool
    optim: str = "adamw"

    def describe(self) -> str:
        name = {"full": "full FT", "lora": "LoRA", "qlora": "QLoRA (NF4 base)"}[self.method]
        extra = [" + gradient checkpointing" if self.checkpointing else "", " + 8-bit AdamW" if self.optim != "adamw" else ""]
        return name + "".join(extra)


def ladder(method: str, priority: str) -> list[Rung]:
    """Setups to try, in order: full FT (when the study favours it) or LoRA, then checkpointing, then a 4-bit base,
    then 8-bit optimizer states. The memory priority starts at QLoRA with checkpointing."""
    smallest = [Rung("qlora", True), Rung("qlora", True, "paged_adamw8bit")]
    if priority == "memory":
        return smallest
    start = [Rung("full", False), Rung("full", True)] if method == "full" else []
    return start + [Rung("lora", False), Rung("lora", True)] + smallest


@dataclass
class MemoryFit:
    rung: Rung
    micro_batch: int
    plan: MemoryPlan  # at the chosen rung's checkpointing, optimizer and micro-batch
    peak: int
    fits: bool  # False: nothing fits, and this is the smallest setup
    tried: list[tuple[Rung, int, int]]  # (rung, micro-batch, peak) of each setup that did not fit, for the reasons
    full_plan: MemoryPlan | None = None


def fit_memory(model, lora, seq: int, dtype: torch.dtype, device: str, memory_gb: float | None, method: str,
               priority: str) -> MemoryFit:
    """Walk the ladder; at each rung take the largest micro-batch (up to 16, the study's batch) whose planned peak
    fits in HEADROOM x memory_gb. Without a budget: the first rung at micro-batch 16 (memory priority: 1)."""
    plan = plan_memory(model, lora_config=lora, batch=1, seq=seq, dtype=dtype, device=device, serve_adapters=0)
    # lorakit train keeps full fine-tuning's weights in fp32 (bf16 means autocast), so its plan is made in fp32.
    full_plan = (plan_memory(model, method="full", lora_config=lora, batch=1, seq=seq, dtype=torch.float32,
                             device=device, serve_adapters=0) if method == "full" else None)
    budget = None if memory_gb is None else memory_gb * 2**30 * HEADROOM
    tried = []
    rungs = ladder(method, priority)
    for rung in rungs:
        base = full_plan if rung.method == "full" else plan
        batches = MICRO_BATCHES if budget is not None or priority != "memory" else (1,)
        for micro in batches:
            p = replan(base, batch=micro, gradient_checkpointing=rung.checkpointing, optim=rung.optim)
            peak = p.methods[rung.method].peak
            if budget is None or peak <= budget:
                return MemoryFit(rung, micro, p, peak, True, tried, full_plan)
        tried.append((rung, 1, peak))
    return MemoryFit(rungs[-1], 1, p, peak, False, tried, full_plan)


def gib(n: float) -> str:
    return human(int(n))


def cannot_fit(fit: MemoryFit, memory_gb: float, seq: int) -> str:
    """The plain statement that even the smallest setup does not fit, with what it needs and what would help."""
    p = fit.plan
    weights = p.methods["qlora"].weights
    need = fit.peak / HEADROOM / 2**30
    return (f"{memory_gb:g} GiB cannot fit even QLoRA of this {p.base.total / 1e9:.3g}B-parameter model: its 4-bit "
            f"weights alone are {gib(weights)}, and the smallest setup ({fit.rung.describe()}, batch 1 x {seq} tokens) "
            f"peaks at {gib(fit.peak)} (memory plan). It needs about {need:.3g} GiB (the peak + 10% for the framework); "
            f"else use a smaller model{', or shorter rows (--seq)' if weights < memory_gb * 2**30 * HEADROOM else ''}. "
            f"The settings below are that smallest setup")
