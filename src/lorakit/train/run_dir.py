"""The run directory (`--out`): what a run leaves there, and when it may write into one that holds a run.

A run is never replaced or restarted silently: continuing one needs --resume, replacing it --overwrite.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import ConfigError
from .checkpoint import STEP_DIR, list_checkpoints

# What a run writes into --out: --overwrite removes exactly these (and nothing else a user keeps there).
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "train_config.json",
             "diagnostics.txt", "loss.png")
RUN_DIRS = ("best", "checkpoints")


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse --resume with nothing to resume, and a new run over an old one without --overwrite."""
    checkpoints = list_checkpoints(out)
    has_adapter = (out / "adapter_config.json").exists()
    if resume and not checkpoints:
        where = (f"{out} holds an adapter but no checkpoint to continue from" if has_adapter
                 else f"there is no checkpoint in {out / 'checkpoints'}")
        raise ConfigError(f"--resume: nothing to resume, {where}. Drop --resume to start a new run"
                          + (" (with --overwrite to replace this one)" if has_adapter else "") + "; nothing was changed")
    if (checkpoints or has_adapter) and not resume and not overwrite:
        held = f"checkpoints up to {checkpoints[-1].name}" if checkpoints else "an adapter"
        raise ConfigError(f"{out} already holds a run ({held}); pass --resume to continue it (e.g. with a larger "
                          "--max-steps), --overwrite to replace it, or choose another --out; nothing was changed")


def check_resume_step(out: Path, max_steps: int) -> None:
    """A resumed run must have steps left to train (its newest checkpoint is below --max-steps)."""
    step = int(STEP_DIR.match(list_checkpoints(out)[-1].name).group(1))
    if step >= max_steps:
        raise ConfigError(f"--resume: the run in {out} is at step {step} already and --max-steps is {max_steps}; "
                          "pass a larger --max-steps (or --epochs) to train further; nothing was changed")


def remove_run(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def written(out: Path, best_step: int | None, plot: bool, seconds: float, what: str = "adapter (PEFT format)") -> str:
    """The run's last-but-one line: exactly what it left in `out` (`what`: the trained weights' form)."""
    parts = [what, f"best/ (step {best_step})"]
    checkpoints = [p.name for p in list_checkpoints(out)]
    if checkpoints:
        parts.append(f"checkpoints/{{{','.join(checkpoints)}}} (continue with --resume and a larger --max-steps)")
    parts += ["metrics.json", *(["loss.png"] if plot else []), "diagnostics.txt", "train_config.json"]
    return f"wrote to {out}: {', '.join(parts)} ({seconds:.0f}s)"
