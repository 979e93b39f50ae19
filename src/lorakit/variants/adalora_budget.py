"""AdaLoRA's training side: where the rank budget goes (importance, cubic schedule, pruning) and the
orthogonality regulariser. A training loop calls two functions:

    loss = task_loss + lorakit.adalora_orth_loss(model)      # every step (PEFT adds it inside forward)
    loss.backward(); optimizer.step()
    lorakit.adalora_step(model, step)                        # step = optimizer steps done, 1, 2, ..., total_step
    optimizer.zero_grad()

Importance (the paper's eq. 7-9, PEFT's RankAllocator): for every entry of A, E and B, the sensitivity |w·∂L/∂w|
is smoothed by an EMA (β1), its uncertainty |I − Ī| by another (β2), and a triplet scores
`s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)` with `s = Ī·Ū`. The budget (kept triplets over all layers) falls from the
sum of ranks to `target_r · layers` on a cubic schedule; the lowest-scoring triplets get E_i = 0.
The moving averages live on the adapters (buffers), so nothing else has to be kept by the caller.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterNotFoundError, ConfigError
from ..state import adapter_layers, get_state
from .adalora import IMPORTANCE, AdaLoraAdapter, AdaLoraConfig


def adalora_step(model: nn.Module, global_step: int, adapter: str | None = None) -> int:
    """Update the importance scores and prune to this step's budget. Call once after each optimizer step, while
    the gradients are still there (before `zero_grad`), with `global_step` = optimizer steps done so far
    (1 after the first). Steps follow PEFT's `update_and_allocate`: up to `tinit` scores only, then prune every
    `delta_t` steps on the cubic schedule, prune to the final budget at `total_step - tfinal`, and keep that
    pattern from then on. Returns the total rank (triplets kept over all layers) after this step.
    """
    name, config, layers = _adalora(model, adapter)
    adapters = [a for _, a in layers]
    init_budget = sum(len(a.slots) for a in adapters)
    target_budget = config.target_r * len(adapters)
    end = config.total_step - config.tfinal
    if global_step < end:
        _update_importance(adapters, config)
        budget, prune = budget_schedule(config, global_step, init_budget, target_budget)
        if prune:
            _prune_to_budget(model, name, config, layers, budget, init_budget)
    elif global_step == end:
        _prune_to_budget(model, name, config, layers, target_budget, init_budget)
        for a in adapters:  # the final pattern is fixed: the scores are not needed any more
            a.reset_importance()
    else:  # the optimizer may have moved pruned E_i away from zero: put them back
        with torch.no_grad():
            for a in adapters:
                a.lora_E.masked_fill_(~a.rank_mask.view(-1, 1), 0.0)
    return sum(a.rank for a in adapters)


def budget_schedule(config: AdaLoraConfig, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """(budget, whether to prune at this step): PEFT's cubic schedule, `b(t) = b_T + (b_0 − b_T)·(1 − progress)³`."""
    if step <= config.tinit:
        return init_budget, False
    end = config.total_step - config.tfinal
    if step > end:
        return target_budget, True
    progress = (step - config.tinit) / (end - config.tinit)
    budget = int((init_budget - target_budget) * (1 - progress) ** 3 + target_budget)
    return budget, step % config.delta_t == 0


def adalora_orth_loss(model: nn.Module, adapter: str | None = None) -> torch.Tensor:
    """`orth_reg_weight · mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F)` over every A and B: keeps P and Q near-orthogonal, so
    E holds the singular values and pruning one triplet removes one direction (the paper's eq. 4, PEFT's forward)."""
    _, config, layers = _adalora(model, adapter)
    # Layers of one shape are batched (one bmm and one norm instead of a few ops per layer).
    groups: dict[tuple, list[torch.Tensor]] = {}
    for _, a in layers:
        for m in (a.lora_A, a.lora_B.T):  # r×in and r×out: AAᵀ and BᵀB are r×r
            groups.setdefault(tuple(m.shape), []).append(m)
    total, count = None, 0
    for (r, _), mats in groups.items():
        stacked = torch.stack(mats)
        cov = torch.bmm(stacked, stacked.transpose(1, 2))
        eye = torch.eye(r, dtype=cov.dtype, device=cov.device)
        norms = torch.linalg.matrix_norm(cov - eye).sum()
        total = norms if total is None else total + norms
        count += len(mats)
    return total * (config.orth_reg_weight / count)


def _adalora(model: nn.Module, adapter: str | None) -> tuple[str, AdaLoraConfig, list[tuple[str, AdaLoraAdapter]]]:
    """The AdaLoRA adapter's name (default: the active AdaLoRA adapter), config and (module, layer object) pairs."""
    state = get_state(model)
    if adapter is None:
        names = [a.name for a in state.active] if state else []
        adapter = next((n for n in names if isinstance(state.configs[n], AdaLoraConfig)), None)
        if adapter is None:
            raise AdapterNotFoundError("the model has no active AdaLoRA adapter; inject one with "
                                       "lorakit.inject(model, lorakit.AdaLoraConfig(...)) or pass adapter=NAME")
    if state is None or adapter not in state.configs:
        raise AdapterNotFoundError(f"no adapter named {adapter!r}; the model has: {list(state.configs) if state else []}")
    config = state.configs[adapter]
    if not isinstance(config, AdaLoraConfig):
        raise ConfigError(f"adapter {adapter!r} is a {config.method} adapter; AdaLoRA's allocator needs an AdaLoRA one")
    return adapter, config, [(m, a) for m, _, a in adapter_layers(model, adapter)]


@torch.no_grad()
def _update_importance(layers: list[AdaLoraAdapter], config: AdaLoraConfig) -> None:
    """Ī ← β1·Ī + (1−β1)·|w·g|,  Ū ← β2·Ū + (1−β2)·| |w·g| − Ī |, for every entry of every A, E, B at once."""
    params = [p for a in layers for p in (a.lora_A, a.lora_E, a.lora_B)]
    if all(p.grad is None for p in params):
        raise ConfigError("adalora_step found no gradients: call it after optimizer.step() and before zero_grad()")
    for a in layers:
        if a.ipt_A is None:
            a.reset_importance(zeros=True)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    ipt_avg = [t for a in layers for t in (a.ipt_A, a.ipt_E, a.ipt_B)]
    unc_avg = [t for a in layers for t in (a.unc_A, a.unc_E, a.unc_B)]
    ipt = torch._foreach_mul(params, grads)
    torch._foreach_abs_(ipt)
    # The same operations in the same order as PEFT, so the scores (and so the pruning) agree bit for bit.
    torch._foreach_mul_(ipt_avg, config.beta1)
    torch._foreach_add_(ipt_avg, torch._foreach_mul(ipt, 1 - config.beta1))
    diff = torch._foreach_sub(ipt, ipt_avg)
    torch._foreach_abs_(diff)
    torch._foreach_mul_(unc_avg, config.beta2)
    torch._foreach_add_(unc_avg, torch._foreach_mul(diff, 1 - config.beta2))


def triplet_scores(a: AdaLoraAdapter) -> torch.Tensor:
    """Each triplet's importance: s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), with s = Ī·Ū (zeros before any update)."""
    if a.ipt_A is None:
        return torch.zeros(a.lora_E.shape[0], device=a.lora_E.device)
    s_A, s_E, s_B = a.ipt_A * a.unc_A, a.ipt_E * a.unc_E, a.ipt_B * a.unc_B
    return s_E.view(-1) + (s_A.mean(1) + s_B.mean(0))


@torch.no_grad()
def _prune_to_budget(model, name, config, layers, budget: int, init_budget: int) -> None:
    """Keep the `budget` highest-scoring triplets over all layers (PEFT's rule: prune every score ≤ the k-th lowest)."""
    scores = [triplet_scores(a) for _, a in layers]
    k = init_budget - budget
    threshold = torch.kthvalue(torch.cat(scores), k).values if k > 0 else None
    for (_, a), s in zip(layers, scores):
        a.rank_mask.copy_(s > threshold if threshold is not None else torch.ones_like(a.rank_mask))
        a.lora_E.masked_fill_(~a.rank_mask.view(-1, 1), 0.0)
    _record_pattern(model, name, config, layers)


def _record_pattern(model, name, config, layers) -> None:
    """Write the kept triplets into the adapter's config as PEFT's rank_pattern, so saving writes the pruned form."""
    pattern = {f"{m}.lora_E": a.kept_pattern(config.init_r) for m, a in layers}
    get_state(model).configs[name] = config.replace(rank_pattern=pattern)


# --- continuing a run: everything the allocator and the full-size tensors hold ---------------------------


def adalora_training_state(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's full-size A, E, B (pruned triplets included), its masks and moving averages, by module:
    what a checkpoint needs beyond the saved (pruned) adapter to continue a run exactly."""
    _, _, layers = _adalora(model, adapter)
    out = {}
    for module, a in layers:
        out[f"{module}.rank_mask"] = a.rank_mask.to(torch.uint8)
        for t in ("lora_A", "lora_E", "lora_B") + IMPORTANCE:
            value = getattr(a, t)
            if value is not None:
                out[f"{module}.{t}"] = value.detach()
    return {k: v.cpu().contiguous() for k, v in out.items()}


@torch.no_grad()
def load_adalora_training_state(model: nn.Module, tensors: dict[str, torch.Tensor], adapter: str | None = None) -> None:
    """Restore what `adalora_training_state` returned into the same adapter (same layers, same sizes)."""
    name, config, layers = _adalora(model, adapter)
    for module, a in layers:
        try:
            a.rank_mask.copy_(tensors[f"{module}.rank_mask"].bool())
            for t in ("lora_A", "lora_E", "lora_B"):
                getattr(a, t).copy_(tensors[f"{module}.{t}"])
        except (KeyError, RuntimeError) as e:
            raise ConfigError(f"the saved AdaLoRA state does not fit layer {module!r} ({e}); it comes from another run") from None
        a.reset_importance()
        if f"{module}.ipt_A" in tensors:
            for t in IMPORTANCE:
                setattr(a, t, tensors[f"{module}.{t}"].to(a.lora_A.device).clone())
    _record_pattern(model, name, config, layers)
