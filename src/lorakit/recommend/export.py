"""Turn the quality study's results directory (bench/quality.py) into the small data file the recommender ships
with, `lorakit/data/study.json`: each cell's numbers, settings, date, machine, model and data, nothing else.

The library cannot read the study's results or docs at run time (they are not installed), so the numbers it
cites travel inside the package; `scripts/export_study.py` refreshes them when more cells finish.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from ..files import atomic_write_json
from ..train.builtin import DATA_DIR, MODEL_DIRNAME

STUDY_FILE = DATA_DIR / "study.json"
SCORES = {"causal-lm": "exact_match", "classify": "accuracy"}
# The settings a reason may need to describe a cell (TrainConfig's names).
SETTINGS = ("method", "rank", "alpha", "rslora", "targets", "layers_to_transform", "init", "quantize", "dropout", "lr",
            "schedule", "warmup_steps", "batch_size", "grad_accum", "max_steps", "max_length", "precision", "seed")
NUMBERS = ("eval_loss", "trainable_params", "total_params", "peak_memory_bytes", "peak_memory_measure",
           "step_seconds_median", "step_cpu_seconds_median", "steps", "seconds", "stopped_reason")


def export_study(cells, results: str | os.PathLike) -> dict[str, Any]:
    """The data file's content for `cells` (bench/quality.py's CELLS: name, task, seed, flags, rows) as they stand in
    `results`: finished cells with their numbers, the others with their state (pending, failed, not run)."""
    results = Path(results)
    machine = describe_machine()
    out = {}
    for cell in cells:
        entry = {"task": cell.task, "seed": cell.seed, "flags": cell.flags, "tables": dict(cell.rows)}
        record = _read_json(results / "records" / f"{cell.name}.json")
        metrics_path = results / "cells" / cell.name / "metrics.json"
        if metrics_path.exists():
            entry.update(status="done", machine=machine, **_finished(json.loads(metrics_path.read_text()), cell.task,
                                                                      record, metrics_path))
        else:
            entry["status"] = record.get("status", "not run")
            if entry["status"] == "pending" and record.get("reason"):
                entry["reason"] = record["reason"]
        out[cell.name] = entry
    return {
        "about": "cells of lorakit's quality study (bench/quality.py): every number is a measured `lorakit train` run; "
                 "refresh with `python scripts/export_study.py --results DIR` when more cells finish",
        "exported": time.strftime("%Y-%m-%d %H:%M"),
        "cells": out,
    }


def write_study_data(data: dict[str, Any], path: str | os.PathLike = STUDY_FILE) -> Path:
    atomic_write_json(Path(path), data)
    return Path(path)


def describe_machine() -> str:
    """One line: the CPU (or GPU) and the software the cells ran with (the exporter runs where the study ran)."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()}-core {cpu}{gpu}, torch {torch.__version__}"


def _finished(m: dict, task: str, record: dict, metrics_path: Path) -> dict[str, Any]:
    config = m.get("config", {})
    key = SCORES[task]
    done = record.get("started", 0) + record.get("seconds", 0) if record.get("started") else metrics_path.stat().st_mtime
    train_rows, eval_rows = _split_sizes(config)
    entry = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(done)),
        "model": _model_name(config.get("base")),
        "data": Path(config.get("data") or "?").name + (" (lorakit's bundled data)" if _bundled(config.get("data")) else ""),
        "train_rows": train_rows, "eval_rows": eval_rows,
        "metric": key, "score": m.get("final", {}).get(key),
        "base_score": (m.get("base") or {}).get(key),
        "settings": {k: config.get(k, m.get(k)) for k in SETTINGS if k in config or k in m},
    }
    entry.update({k: m.get(k) for k in NUMBERS if k in m})
    return entry


def _model_name(base: str | None) -> str:
    if not base:
        return "?"
    name = Path(base).name
    return "SmolLM2-135M-Instruct (lorakit's built-in model)" if name == MODEL_DIRNAME else name


def _bundled(data: str | None) -> bool:
    return bool(data) and (DATA_DIR / Path(data).name).is_file()


def _split_sizes(config: dict) -> tuple[int | None, int | None]:
    """Training and held-out rows as `lorakit train` splits them (train/data.py::split)."""
    data = config.get("data")
    path = Path(data) if data else None
    if path is not None and not path.is_file() and _bundled(data):
        path = DATA_DIR / path.name  # the study ran from another checkout: the same bundled file
    if path is None or not path.is_file() or config.get("eval_data"):
        return None, None
    with open(path, encoding="utf-8") as f:
        rows = sum(1 for line in f if line.strip()) - (1 if path.suffix == ".csv" else 0)
    n_eval = int(round(rows * config.get("eval_fraction", 0.1)))
    if config.get("max_eval") is not None:
        n_eval = min(n_eval, config["max_eval"])
    return rows - n_eval, n_eval


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
