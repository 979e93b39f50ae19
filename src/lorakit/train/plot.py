"""The loss curve as a PNG: train loss per step (and its running mean), eval loss at each evaluation."""

from __future__ import annotations

from pathlib import Path

from ..files import atomic_write
from .checkpoint import Progress


def plot_losses(progress: Progress, path: Path, title: str = "lorakit train") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional: pip install 'lorakit[train]'
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if progress.train_loss:
        steps, losses = zip(*progress.train_loss)
        ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="train loss")
        k = len(losses) // 20
        if k > 1:  # a running mean shows the trend through per-batch noise
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, color="#3182bd", linewidth=2, label=f"train loss (mean of {k})")
    evals = [(m["step"], m["eval_loss"]) for m in progress.eval_metrics if "eval_loss" in m]
    if evals:
        ax.plot(*zip(*evals), "o-", color="#e6550d", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
