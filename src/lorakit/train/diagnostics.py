"""What went wrong (or right) in a run, in plain words, from the numbers the loop recorded: each finding says
what to change. `diagnose_run` (exported as `lorakit.diagnose`) also reads Hugging Face Trainer logs and scans
an adapter or model for NaN/Inf and exploding norms."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MergeStateError
from .checkpoint import Progress

# An adapter's update ‖ΔW‖ is "exploding" above this share of the pretrained weight's norm ‖W0‖ (the demo's
# adapter after 60 steps at lr 1e-3 reaches 0.014 at most), or, without the base, above this many times the
# median layer's update.
RELATIVE_NORM_LIMIT = 0.5
OUTLIER_FACTOR = 10.0


@dataclass(frozen=True)
class Finding:
    kind: str  # e.g. "overfitting", "nan-weights"; stable, for code that acts on findings
    message: str  # what was seen, and what to change

    def __str__(self) -> str:
        return self.message


def diagnose(progress: Progress, trainable: int, total: int, rank_usage: list[tuple[int, int]] | None = None,
             method: str = "lora") -> list[str]:
    """Plain-language findings of a lorakit run; an empty list means nothing looked wrong."""
    found = _parameter_count(trainable, total) if method != "full" else []  # full FT trains everything on purpose
    found += check_history(progress)
    found += _rank_usage(rank_usage or [])
    return [f.message for f in found]


def diagnose_run(history: Any, model: nn.Module | str | Path | None = None) -> list[Finding]:
    """Findings for any run. `history`: a lorakit run directory or metrics.json, a Hugging Face Trainer
    output_dir, trainer_state.json or `trainer.state.log_history`, or a Progress. `model`: an adapted model,
    or an adapter / model directory, to scan for NaN/Inf, exploding norms and full-rank updates; by default
    the weights the run left next to its history, if any."""
    from .history import read_history

    run = read_history(history)
    found = []
    if run.trainable is not None and run.total is not None and run.method != "full":
        found += _parameter_count(run.trainable, run.total)
    found += check_history(run.progress)
    target = model if model is not None else run.weights_dir
    if isinstance(target, nn.Module):
        found += scan_model(target)
    elif target is not None:
        found += scan_weights(Path(target))
    return found


# --- the history -------------------------------------------------------------------------------------------


def check_history(progress: Progress) -> list[Finding]:
    found = []
    if progress.stopped_reason:
        found.append(Finding("stopped", progress.stopped_reason))
    bad = [(s, v) for s, v in progress.train_loss if not math.isfinite(v)]
    if bad and not progress.stopped_reason:
        found.append(Finding("nan-loss", f"The training loss was {bad[0][1]} at step {bad[0][0]} ({len(bad)} logged "
                                         "value(s) not finite); the weights after that step are suspect. Resume from "
                                         "a checkpoint before it with a lower learning rate, gradient clipping "
                                         "(max_grad_norm 1.0) and fp32 or bf16 instead of fp16."))
    losses = [v for _, v in progress.train_loss if math.isfinite(v)]
    if len(losses) >= 10:
        k = max(1, len(losses) // 10)
        first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
        if last > first * 0.98:
            found.append(Finding("plateau", f"Training loss did not fall ({first:.3f} at the start, {last:.3f} at the "
                                            "end): try a larger learning rate or more steps, and check that the "
                                            "labels/completions are what you expect."))
        spikes = _spikes(progress.train_loss)
        if spikes:
            found.append(Finding("loss-spikes", f"Loss spiked at step(s) {spikes[:5]} (over 3x the recent median): a "
                                                "lower learning rate, more warmup or a smaller --max-grad-norm usually helps."))
    jumps = _spikes(progress.grad_norm, factor=OUTLIER_FACTOR)
    if jumps:
        peak = max(v for s, v in progress.grad_norm if s in jumps)
        found.append(Finding("gradient-spikes", f"The gradient norm jumped to {peak:.3g} at step(s) {jumps[:5]} (over "
                                                f"{OUTLIER_FACTOR:g}x the recent median): clip it (--max-grad-norm 1.0), "
                                                "lower the learning rate or warm up for longer."))
    found += _overfitting(progress)
    return found


def _parameter_count(trainable: int, total: int) -> list[Finding]:
    if trainable == 0:
        return [Finding("no-trainable", "No parameter is trainable: the adapter matched no module or everything is "
                                        "frozen; check --targets.")]
    share = trainable / max(total, 1)
    if share > 0.10:
        return [Finding("many-trainable", f"{100 * share:.1f}% of all parameters are trainable, far more than LoRA "
                                          "needs (usually <1%): is a large module in modules_to_save, or bias='all' "
                                          "on a big model?")]
    return []


def _spikes(series: list[tuple[int, float]], window: int = 20, factor: float = 3.0) -> list[int]:
    steps = []
    for i in range(min(window, len(series)), len(series)):
        recent = [v for _, v in series[max(0, i - window):i] if math.isfinite(v)]
        if len(recent) >= 5 and series[i][1] > factor * statistics.median(recent):
            steps.append(series[i][0])
    return steps


def _overfitting(progress: Progress) -> list[Finding]:
    evals = sorted((m["step"], m["eval_loss"]) for m in progress.eval_metrics if "eval_loss" in m)
    if len(evals) < 3:
        return []
    best_step, best = min(evals, key=lambda x: x[1])
    last_step, last = evals[-1]
    if last_step != best_step and last > best * 1.05:
        return [Finding("overfitting", f"Eval loss rose from {best:.3f} (step {best_step}) to {last:.3f} (step "
                                       f"{last_step}) while training continued: the adapter is overfitting. Keep the "
                                       "checkpoint of the best step (lorakit keeps it in OUT/best); use fewer steps, "
                                       "more data, dropout or weight decay.")]
    return []


def _rank_usage(rank_usage: list[tuple[int, int]]) -> list[Finding]:
    full = sum(1 for used, r in rank_usage if used >= r)
    if rank_usage and full >= 0.5 * len(rank_usage):
        r = rank_usage[0][1]
        return [Finding("full-rank", f"The adapter uses its full rank in {full} of {len(rank_usage)} layers (90% of "
                                     f"its update energy needs all r={r} directions): a larger --rank may learn more.")]
    return []


# --- the weights -------------------------------------------------------------------------------------------


def scan_model(model: nn.Module) -> list[Finding]:
    """NaN/Inf, exploding updates (relative to the base weight) and rank usage of every adapter in `model`."""
    from ..state import lora_layers

    bad, norms, usage = [], [], []
    for name, layer in lora_layers(model):
        base_norm = float(layer.unmerged_weight().detach().float().norm())
        for adapter_name, adapter in layer.adapters.items():
            if not all(torch.isfinite(p).all() for p in adapter.parameters()):
                bad.append(f"{name} ({adapter_name})")
                continue
            try:
                A, B = (f.detach() for f in adapter.factors())  # every variant's effective ΔW = scale·B·A
            except MergeStateError:  # a mixture of experts has no single ΔW
                continue
            norm, used = low_rank_stats(A, B)
            norms.append((name, adapter.scale * norm, base_norm))
            usage.append((used, adapter.rank))
    if bad:
        return [_nan_finding(bad)]
    return _exploding(norms) + _rank_usage(usage)


def scan_weights(path: Path) -> list[Finding]:
    """The same scan on files: an adapter directory (norms without the base: outliers between layers), or a
    full model directory (NaN/Inf only)."""
    from safetensors import safe_open

    files = sorted(path.glob("adapter_model.safetensors")) or sorted(path.glob("model*.safetensors"))
    bad = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            bad += [key for key in f.keys() if not torch.isfinite(f.get_tensor(key).float()).all()]
    if bad:
        return [_nan_finding(bad)]
    if not (path / "adapter_model.safetensors").exists():
        return []
    from ..inspect import effective_rank
    from ..io import read_adapter_config, read_adapter_tensors, split_factor_key
    from ..variants import adapter_class

    config = read_adapter_config(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in read_adapter_tensors(path).items():
        if factor := split_factor_key(key):
            parts.setdefault(factor[0], {})[factor[1]] = value
    norms, usage = [], []
    for module, layer_parts in sorted(parts.items()):
        A, B = layer_parts.get("lora_A", layer_parts.get("lora_embedding_A")), \
            layer_parts.get("lora_B", layer_parts.get("lora_embedding_B"))
        if A is not None and B is not None:  # plain factors: the fast route
            norm, used = low_rank_stats(A, B)
            norms.append((module, config.scale_for(module) * norm, None))
        else:  # a variant that stores something else: its own ΔW
            delta = adapter_class(config).delta_from_file(layer_parts, config, module)
            norm, used = float(delta.norm()), effective_rank(delta)
            norms.append((module, norm, None))
        usage.append((used, config.rank_for(module)))
    return _exploding(norms) + _rank_usage(usage)


def low_rank_stats(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[float, int]:
    """‖B·A‖ and its effective rank from r×r matrices, not from the full update: with B = Q_B·R_B and
    Aᵀ = Q_A·R_A, B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ has the singular values of R_B·R_Aᵀ (84 full SVDs of the
    built-in model's update take minutes on a busy CPU; these take milliseconds)."""
    from ..inspect import effective_rank

    a, b = lora_A.float().flatten(1), lora_B.float().flatten(1)  # (r, in), (out, r); conv2d kernels flattened
    core = torch.linalg.qr(b, mode="r").R @ torch.linalg.qr(a.T, mode="r").R.T
    return float(core.norm()), effective_rank(core)


def _nan_finding(names: list[str]) -> Finding:
    return Finding("nan-weights", f"{len(names)} weight tensor(s) hold NaN or Inf (first: {names[0]}): these weights "
                                  "are broken and every output through them is too. Go back to the last good "
                                  "checkpoint and retrain with a lower learning rate, gradient clipping "
                                  "(--max-grad-norm 1.0) and fp32.")


def _exploding(norms: list[tuple[str, float, float | None]]) -> list[Finding]:
    """`norms`: (layer, ‖ΔW‖, ‖W0‖ or None)."""
    relative = [(name, d / w) for name, d, w in norms if w]
    if relative:
        big = [(n, r) for n, r in relative if r > RELATIVE_NORM_LIMIT]
        if big:
            name, worst = max(big, key=lambda x: x[1])
            return [Finding("exploding-norm", f"The update is large against the pretrained weight in {len(big)} "
                                              f"layer(s): ‖ΔW‖/‖W0‖ up to {worst:.2f} ({name}); above "
                                              f"{RELATIVE_NORM_LIMIT:g} the adapter overwrites what the model knew. "
                                              "Lower the learning rate or α (the update scales with α/r), or train "
                                              "fewer steps.")]
        return []
    values = [d for _, d, _ in norms]
    if len(values) < 4:
        return []
    median = statistics.median(values)
    big = [(n, d) for n, d, _ in norms if median > 0 and d > OUTLIER_FACTOR * median]
    if big:
        name, worst = max(big, key=lambda x: x[1])
        return [Finding("exploding-norm", f"{len(big)} layer(s) have an update over {OUTLIER_FACTOR:g}x the median "
                                          f"layer's (‖ΔW‖ up to {worst:.3g} in {name}, median {median:.3g}): a sign of "
                                          "divergence in those layers. Lower the learning rate or α, or clip gradients "
                                          "(--max-grad-norm 1.0).")]
    return []
