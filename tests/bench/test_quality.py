"""bench/quality.py, the study runner: real `lorakit train` cells on a tiny model, skipped when done, resumed
when killed, "pending" when a flag is not accepted yet; and the report's verdicts on synthetic numbers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..train.helpers import letter_rows, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import quality  # noqa: E402
import quality_report  # noqa: E402

from quality import Cell  # noqa: E402


@pytest.fixture
def study(lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "l.jsonl", letter_rows(80))
    extra = ["--base", str(lm_dir), "--data", str(data), "--max-steps", "4", "--batch-size", "8", "--lr", "3e-3",
             "--eval-fraction", "0.2", "--max-eval", "8", "--save-every", "2"]
    return tmp_path / "results", tmp_path / "docs" / "quality.md", extra


def test_runner_runs_cells_resumes_skips_and_marks_pending(study, monkeypatch):
    """Two real cells (LoRA, full FT) on the tiny model, one pending; then a killed cell resumed, done ones skipped."""
    results, doc, extra = study
    cells = [Cell("lora", "--rank 2 --alpha 4", {"headline": "LoRA r=8", "method": "LoRA"}, base=True),
             Cell("full", "--method full", {"headline": "full FT", "method": "full FT"}),
             Cell("dora", "--method dora-someday", {"method": "DoRA"})]
    (results / "cells" / "full").mkdir(parents=True)
    (results / "cells" / "full" / "stale.txt").write_text("killed before its first checkpoint")
    states = quality.run_study(cells, results, doc, extra, keep_weights=True, say=lambda *a: None)
    assert states == {"lora": "done", "full": "done", "dora": "pending"}
    assert not (results / "cells" / "full" / "stale.txt").exists()  # restarted from scratch
    data = json.loads(doc.with_suffix(".json").read_text())
    lora, full = data["cells"]["lora"], data["cells"]["full"]
    assert lora["base_score"] is not None and full.get("base_score") is None  # base evaluated once
    assert full["method"] == "full" and full["trainable_params"] == full["total_params"]
    assert lora["trainable_params"] < full["trainable_params"] and lora["peak_memory_bytes"] > 0
    assert lora["step_cpu_seconds_median"] > 0
    assert data["cells"]["dora"]["status"] == "pending" and "dora-someday" in data["cells"]["dora"]["reason"]
    text = doc.read_text()
    assert "| base model (no training) |" in text and "| DoRA |" in text and "pending" in text
    assert (doc.parent / "quality" / "lora_vs_full.png").read_bytes()[:4] == b"\x89PNG"

    # killed after its step-2 checkpoint: the next run resumes it (that a resumed run ends where a straight
    # one ends is tested in tests/train; here, that the runner asks for it)
    out = results / "cells" / "lora"
    metrics = (out / "metrics.json").read_text()
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "checkpoints" / "step-000004")
    commands, real_popen = [], subprocess.Popen

    class Finishes:  # a `lorakit train` that finishes at once (git, asked for the commit, still runs)
        def __new__(cls, command, **kw):
            if "lorakit" not in command:
                return real_popen(command, **kw)
            commands.append(command)
            (out / "metrics.json").write_text(metrics)
            return super().__new__(cls)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Finishes)
    assert quality.run_study(cells[:2], results, doc, extra, say=lambda *a: None) == {"lora": "done", "full": "done"}
    assert len(commands) == 1 and commands[0][-1] == "--resume" and commands[0][-2] == str(out)
    record = json.loads((results / "records" / "lora.json").read_text())
    assert record["resumed"] is True and "commit" in record  # which lorakit ran it (None outside a git checkout)
    assert not (out / "checkpoints").exists()  # pruned once finished (without --keep-weights)
    # finished cells are skipped
    assert quality.run_study(cells[:2], results, doc, extra, say=lambda *a: None) == {"lora": "done", "full": "done"}
    assert len(commands) == 1


def entry(score, params=500, total=100_000, memory=2**30, step=1.0, **rows):
    return {"status": "done", "task": "causal-lm", "seed": 0, "flags": "", "rows": rows, "score": score,
            "trainable_params": params, "total_params": total, "peak_memory_bytes": memory,
            "step_seconds_median": step, "step_cpu_seconds_median": step, "eval_examples": 120, "eval_loss": 0.3}


def test_verdicts_come_from_the_numbers():
    cells = {
        "l0": entry(0.84, headline="LoRA r=8", rank=8, alpha=16, targets="all linear r=8"),
        "l1": entry(0.86, headline="LoRA r=8"),
        "f0": entry(0.85, params=100_000, memory=4 * 2**30, headline="full FT"),
        "r1": entry(0.60, rank=1), "r2": entry(0.83, rank=2), "r64": entry(0.86, rank=64),
        "qv": entry(0.70, targets="q,v r=42"), "qkvo": entry(0.83, targets="q,k,v,o r=21"),
        "a1": entry(0.30, alpha=1), "a128": entry(0.84, alpha=128),
        "dora": {"status": "pending", "task": "causal-lm", "seed": 0, "flags": "--method dora", "rows": {"dora": "DoRA r=2"}},
    }
    verdicts = {claim: verdict for claim, verdict, _ in quality_report.claims({"cells": cells})}
    assert verdicts["LoRA reaches 95-100% of full fine-tuning at under 1% of the parameters and 3-4x less memory"] == "held"
    assert verdicts["Low ranks (1-8) are often enough"] == "held from r=2 up"
    assert verdicts["Adapting all linear layers beats attention-only at the same parameter count"] == (
        "partly: all linear beat q,v r=42 by 14.0 pts; within the noise band (6.5 pts) of q,k,v,o r=21 (+1.0 pts)")
    assert verdicts["alpha = 2r is a safe start"] == "held"
    assert verdicts["alpha far from r breaks training (alpha = 1 or 128 at r = 8)"].startswith("partly: α=1 fell behind")
    assert verdicts["DoRA adds quality at low rank"].startswith("pending")
    cells["f0"]["peak_memory_bytes"] = 2 * 2**30
    verdicts = {c: v for c, v, _ in quality_report.claims({"cells": cells})}
    assert verdicts["LoRA reaches 95-100% of full fine-tuning at under 1% of the parameters and 3-4x less memory"] == (
        "partly: held for quality, parameters; not for memory")
