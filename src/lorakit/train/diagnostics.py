"""What went wrong (or right) in a run, in plain words, from the numbers the loop recorded."""

from __future__ import annotations

import math
import statistics

from .checkpoint import Progress


def diagnose(progress: Progress, trainable: int, total: int, rank_usage: list[tuple[int, int]] | None = None,
             method: str = "lora") -> list[str]:
    """Plain-language findings; an empty list means nothing looked wrong."""
    notes = []
    if method != "full":  # full fine-tuning trains every weight on purpose
        notes += _parameter_count(trainable, total)
    if progress.stopped_reason:
        notes.append(progress.stopped_reason)
    losses = [v for _, v in progress.train_loss if math.isfinite(v)]
    if len(losses) >= 10:
        k = max(1, len(losses) // 10)
        first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
        if last > first * 0.98:
            notes.append(f"Training loss did not fall ({first:.3f} at the start, {last:.3f} at the end): try a larger "
                         "learning rate or more steps, and check that the labels/completions are what you expect.")
        spikes = _spikes(progress.train_loss)
        if spikes:
            notes.append(f"Loss spiked at step(s) {spikes[:5]} (over 3x the recent median): a lower learning rate, "
                         "more warmup or a smaller --max-grad-norm usually helps.")
    notes += _overfitting(progress)
    if rank_usage:
        full = sum(1 for used, r in rank_usage if used >= r)
        if full >= 0.5 * len(rank_usage):
            r = rank_usage[0][1]
            notes.append(f"The adapter uses its full rank in {full} of {len(rank_usage)} layers (90% of its update "
                         f"energy needs all r={r} directions): a larger --rank may learn more.")
    return notes


def _parameter_count(trainable: int, total: int) -> list[str]:
    if trainable == 0:
        return ["No parameter is trainable: the adapter matched no module or everything is frozen; check --targets."]
    share = trainable / max(total, 1)
    if share > 0.10:
        return [f"{100 * share:.1f}% of all parameters are trainable, far more than LoRA needs (usually <1%): "
                "is a large module in modules_to_save, or bias='all' on a big model?"]
    return []


def _spikes(series: list[tuple[int, float]], window: int = 20, factor: float = 3.0) -> list[int]:
    steps = []
    for i in range(window, len(series)):
        recent = [v for _, v in series[i - window:i] if math.isfinite(v)]
        if recent and series[i][1] > factor * statistics.median(recent):
            steps.append(series[i][0])
    return steps


def _overfitting(progress: Progress) -> list[str]:
    evals = [(m["step"], m["eval_loss"]) for m in progress.eval_metrics if "eval_loss" in m]
    if len(evals) < 3:
        return []
    best_step, best = min(evals, key=lambda x: x[1])
    last_step, last = evals[-1]
    if last_step != best_step and last > best * 1.05:
        return [f"Eval loss rose from {best:.3f} (step {best_step}) to {last:.3f} (step {last_step}) while training "
                "continued: the adapter is overfitting. The best adapter is kept in OUT/best; use fewer steps, more "
                "data, dropout or weight decay."]
    return []
