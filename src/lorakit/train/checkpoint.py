"""Checkpoints that lose nothing: adapter + optimizer + scheduler + RNG + data position, written atomically; a
checkpoint written on a GPU resumes on the CPU and back.

Layout:  OUT/checkpoints/step-000040/{adapter_config.json, adapter_model.safetensors, optimizer.pt,
         scheduler.pt, rng.pt, state.json}. A step directory appears only when complete (temp dir + rename),
so a run killed at any instant resumes from the newest directory there.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import LorakitError
from ..files import atomic_directory
from ..io import load_adapter_weights

STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(LorakitError, ValueError):
    """A checkpoint is missing, incomplete or does not fit the run."""


@dataclass
class Progress:
    """Where the run is, and what it has seen so far (kept in state.json, plotted at the end)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens: int = 0
    train_seconds: float = 0.0  # wall time inside training steps (no loading, evaluation or saving)
    step_seconds: list[float] = field(default_factory=list)  # each optimizer step's share of train_seconds
    step_cpu_seconds: list[float] = field(default_factory=list)  # the same steps in CPU time of this process
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_metrics: list[dict[str, float]] = field(default_factory=list)
    grad_norm: list[tuple[int, float]] = field(default_factory=list)
    best_eval_loss: float | None = None
    best_step: int | None = None
    stopped_reason: str | None = None


def rng_state() -> dict[str, torch.Tensor]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": torch.tensor(py_version),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np_state[2]),
    }
    if torch.cuda.is_initialized():  # a run that used a GPU (asking a CPU run would start CUDA for nothing)
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    # Checkpoints move between machines: a GPU run's CUDA states are restored for the GPUs this machine has
    # (none on a CPU); a CPU run's checkpoint has none, and CUDA keeps the generator the run seeded at its start.
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])


def save_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, progress: Progress, keep: int,
                    save_weights: Callable[[nn.Module, Path], object]) -> Path:
    """`save_weights(model, dir)` writes what trains, as the method restores it (train/methods.py)."""
    root = out / "checkpoints"
    target = root / f"step-{progress.step:06d}"
    with atomic_directory(target) as tmp:
        save_weights(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(progress), indent=1))
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(out: Path) -> list[Path]:
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model: nn.Module, adapter: str, optimizer, scheduler,
                    restore_weights: Callable[[nn.Module, Path], None] | None = None,
                    weights_file: str = "adapter_model.safetensors") -> Progress:
    """Restore everything `save_checkpoint` wrote; weights only through safetensors / weights_only loads."""
    needed = [weights_file, "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {missing}); delete it to resume from the one before")
    if restore_weights is None:
        load_adapter_weights(model, adapter, path)
    else:
        restore_weights(model, path)
    try:  # read onto the CPU wherever they were written; load_state_dict moves each state beside its parameter
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True, map_location="cpu"))
        raw = json.loads((path / "state.json").read_text())
    except (RuntimeError, ValueError, KeyError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} could not be restored ({e}); it may come from another run") from None
    raw["train_loss"] = [tuple(x) for x in raw["train_loss"]]
    raw["grad_norm"] = [tuple(x) for x in raw["grad_norm"]]
    return Progress(**raw)

