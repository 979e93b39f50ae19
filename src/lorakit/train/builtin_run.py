"""The settings of `lorakit train` with no arguments: the built-in model on the bundled WordNet data."""

from __future__ import annotations

import time
from typing import Any


def demo_settings(task: str = "causal-lm") -> dict[str, Any]:
    from ..hf import BUILTIN
    from .builtin import default_data_path

    # A fresh directory per run: running the README's first command twice must not trip over the last run.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = {"base": BUILTIN, "data": str(default_data_path(task)), "task": task,
              "compare_base": True, "seed": 0, "save_every": 20, "eval_every": 20}
    if task == "classify":
        return {**common, "out": f"runs/demo-classify-{stamp}", "rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"],
                "max_steps": 60, "batch_size": 16, "lr": 1e-3, "warmup_steps": 5, "max_length": 64}
    return {**common, "out": f"runs/demo-{stamp}", "rank": 8, "alpha": 16,
            "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "layers_to_transform": list(range(18, 30)), "max_steps": 60, "batch_size": 16, "lr": 1e-3,
            "warmup_steps": 5, "max_length": 64, "eval_fraction": 0.12, "max_eval": 120}
