"""A training history from anywhere, in one shape: a lorakit run (its directory or metrics.json) or a Hugging
Face Trainer run (its output directory, a checkpoint's trainer_state.json, or the `log_history` list)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checkpoint import Progress

HF_STATE = "trainer_state.json"
LORAKIT_METRICS = "metrics.json"
LORAKIT_STATE = "state.json"  # in each lorakit checkpoint: the Progress so far


@dataclass
class History:
    progress: Progress  # train_loss, eval_metrics, grad_norm, stopped_reason: what the checks read
    source: str  # "lorakit" or "transformers"
    trainable: int | None = None
    total: int | None = None
    method: str = "lora"
    weights_dir: Path | None = None  # the run's adapter (or full model) directory, when the run left one

    def describe(self) -> str:
        p = self.progress
        kind = "lorakit run" if self.source == "lorakit" else "Hugging Face Trainer log"
        steps = p.train_loss[-1][0] if p.train_loss else 0
        return f"{kind}: {len(p.train_loss)} logged losses up to step {steps}, {len(p.eval_metrics)} evaluations"


def read_history(source: Any) -> History:
    """`source`: a run directory, a metrics.json / trainer_state.json path, their parsed dicts, a Trainer's
    `state.log_history` list, or a `Progress`."""
    if isinstance(source, History):
        return source
    if isinstance(source, Progress):
        return History(source, "lorakit")
    if isinstance(source, list):
        return from_log_history(source)
    if isinstance(source, dict):
        if "log_history" in source:
            return from_log_history(source["log_history"])
        if "train_loss" in source and isinstance(source["train_loss"], list):
            return from_metrics(source)
        raise ConfigError("a history dict must be lorakit's metrics.json (with 'train_loss') or Hugging Face's "
                          "trainer_state.json (with 'log_history')")
    if isinstance(source, (str, os.PathLike)):
        return _from_path(Path(source))
    raise ConfigError(f"cannot read a training history from a {type(source).__name__}")


def _from_path(path: Path) -> History:
    if path.is_dir():
        for name in (LORAKIT_METRICS, HF_STATE):
            if (path / name).is_file():
                return _from_path(path / name)
        for pattern, name in (("checkpoints/step-*", LORAKIT_STATE), ("checkpoint-*", HF_STATE)):
            # a run still going (lorakit), or a Trainer's output_dir: the newest checkpoint holds the whole log
            found = sorted((p for p in path.glob(pattern) if (p / name).is_file()),
                           key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
            if found:
                return _from_path(found[-1] / name)
        if (path / LORAKIT_STATE).is_file():
            return _from_path(path / LORAKIT_STATE)
        raise ConfigError(f"{path} holds no {LORAKIT_METRICS} or checkpoints/step-*/{LORAKIT_STATE} (lorakit run) "
                          f"and no {HF_STATE} or checkpoint-*/{HF_STATE} (Hugging Face Trainer run)")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON file ({e})") from None
    history = from_progress(data) if path.name == LORAKIT_STATE else read_history(data)
    if any((path.parent / f).is_file() for f in ("adapter_model.safetensors", "model.safetensors")):
        history.weights_dir = path.parent
    return history


def from_metrics(m: dict) -> History:
    """lorakit's metrics.json."""
    progress = Progress(
        step=m.get("steps", 0),
        train_loss=[(int(s), float(v)) for s, v in m.get("train_loss", [])],
        grad_norm=[(int(s), float(v)) for s, v in m.get("grad_norm", [])],
        eval_metrics=[e for e in m.get("eval", []) if "step" in e],
        stopped_reason=m.get("stopped_reason"),
    )
    return History(progress, "lorakit", m.get("trainable_params"), m.get("total_params"),
                   m.get("method", m.get("config", {}).get("method", "lora")))


def from_progress(state: dict) -> History:
    """A lorakit checkpoint's state.json (the run so far)."""
    known = {k: v for k, v in state.items() if k in Progress.__dataclass_fields__}
    progress = Progress(**known)
    progress.train_loss = [(int(s), float(v)) for s, v in progress.train_loss]
    progress.grad_norm = [(int(s), float(v)) for s, v in progress.grad_norm]
    return History(progress, "lorakit")


def from_log_history(log: list[dict]) -> History:
    """Trainer's `log_history`: {"loss", "grad_norm", "learning_rate", "epoch", "step"} every logging_steps,
    {"eval_loss", "eval_runtime", ..., "step"} at each evaluation, and a closing {"train_loss", "train_runtime", ...}."""
    if not isinstance(log, list) or not all(isinstance(e, dict) for e in log):
        raise ConfigError("log_history must be a list of dicts, as in Trainer's trainer_state.json")
    progress = Progress()
    for entry in log:
        step = int(entry.get("step", 0))
        if "loss" in entry:
            progress.train_loss.append((step, _number(entry["loss"])))
            if entry.get("grad_norm") is not None:
                progress.grad_norm.append((step, _number(entry["grad_norm"])))
        if "eval_loss" in entry:
            progress.eval_metrics.append({"step": step, **{k: v for k, v in entry.items() if k.startswith("eval_")}})
        progress.step = max(progress.step, step)
    return History(progress, "transformers")


def _number(value) -> float:
    try:
        return float(value)  # JSON's NaN / Infinity arrive as floats already; strings such as "nan" too
    except (TypeError, ValueError):
        return math.nan
