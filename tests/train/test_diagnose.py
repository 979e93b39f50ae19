"""`lorakit.diagnose` / `lorakit diagnose`: each problem on a synthetic curve, Hugging Face Trainer's own
trainer_state.json, and scans of adapters for NaN/Inf, exploding norms and full-rank updates."""

import json
import math

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.inspect import effective_rank
from lorakit.train.checkpoint import Progress
from lorakit.train.diagnostics import low_rank_stats

from ..conftest import load, randomise_lora, tiny_tokenizer
from .helpers import letter_rows

FALLING = [3 - 0.05 * i for i in range(40)]


def hf_log(losses, evals=(), grad_norms=None):
    """log_history exactly as Trainer writes it: a row per logging step, a row per evaluation, a closing summary."""
    log = []
    for step, loss in enumerate(losses, 1):
        row = {"epoch": round(step / len(losses), 4), "grad_norm": (grad_norms or [1.0] * len(losses))[step - 1],
               "learning_rate": 5e-05 * (1 - step / len(losses)), "loss": loss, "step": step}
        log.append(row)
        for s, v in evals:
            if s == step:
                log.append({"epoch": row["epoch"], "eval_loss": v, "eval_runtime": 0.5, "eval_samples_per_second": 64.0,
                            "eval_steps_per_second": 8.0, "step": step})
    log.append({"epoch": 1.0, "step": len(losses), "total_flos": 1234.0, "train_loss": sum(losses) / len(losses),
                "train_runtime": 10.0, "train_samples_per_second": 32.0, "train_steps_per_second": 4.0})
    return log


def kinds(history, model=None):
    return [f.kind for f in lorakit.diagnose(history, model)]


def test_each_problem_on_synthetic_curves():
    assert kinds(hf_log(FALLING)) == []
    assert kinds(hf_log([2.0] * 40)) == ["plateau"]
    spiky = list(FALLING)
    spiky[30] = 50.0
    assert kinds(hf_log(spiky)) == ["loss-spikes"]
    nan = list(FALLING)
    nan[25:] = [math.nan] * 15
    assert kinds(hf_log(nan))[0] == "nan-loss"
    grads = [1.0] * 40
    grads[33] = 80.0
    found = lorakit.diagnose(hf_log(FALLING, grad_norms=grads))
    assert [f.kind for f in found] == ["gradient-spikes"] and "step(s) [34]" in found[0].message
    over = hf_log(FALLING, evals=[(10, 2.0), (20, 1.5), (30, 1.8), (40, 2.2)])
    found = lorakit.diagnose(over)
    assert [f.kind for f in found] == ["overfitting"] and "step 20" in str(found[0])
    # the same checks on lorakit's own records: metrics.json's layout and a Progress
    metrics = {"train_loss": [[i, v] for i, v in enumerate([2.0] * 40, 1)], "eval": [], "steps": 40,
               "trainable_params": 50, "total_params": 100, "method": "lora"}
    assert kinds(metrics) == ["many-trainable", "plateau"]
    assert kinds({**metrics, "method": "full"}) == ["plateau"]
    assert kinds(Progress(step=40, train_loss=list(enumerate(FALLING, 1)))) == []
    with pytest.raises(ConfigError, match="log_history"):
        lorakit.diagnose({"something": 1})


def test_a_real_trainer_state_json(lm_dir, tmp_path, capsys):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = tiny_tokenizer()
    rows = [r["prompt"] + r["completion"] for r in letter_rows(32)]
    ds = Dataset.from_dict({"text": rows}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    model = load(lm_dir)
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=4, use_cpu=True,
                             logging_steps=1, eval_strategy="steps", eval_steps=2, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds.select(range(8)),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
    state_file = tmp_path / "hf" / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    from lorakit.train.history import read_history

    history = read_history(tmp_path / "hf")  # the output_dir: its newest checkpoint's state
    assert [s for s, _ in history.progress.train_loss] == [1, 2, 3, 4]
    assert [e["step"] for e in history.progress.eval_metrics] == [2, 4]
    assert len(history.progress.grad_norm) == 4 and history.weights_dir == state_file.parent
    assert lorakit.diagnose(state_file) == []  # 4 healthy steps: nothing to say (and the weights are finite)
    assert main(["diagnose", str(tmp_path / "hf")]) == 0
    assert "no problems found" in capsys.readouterr().out
    # the same file with the loss gone to NaN halfway and eval loss climbing
    for row in state["log_history"]:
        if row.get("step", 0) >= 3 and "loss" in row:
            row["loss"] = float("nan")
    state["log_history"] += [{"epoch": 2.0, "eval_loss": 9.0, "eval_runtime": 0.1, "step": 6},
                             {"epoch": 3.0, "eval_loss": 12.0, "eval_runtime": 0.1, "step": 8}]
    bad = tmp_path / "bad" / "trainer_state.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(state))  # json writes NaN as Trainer does
    assert main(["diagnose", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "[nan-loss]" in out and "at step 3" in out and "[overfitting]" in out
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2


def test_adapter_scans(lm_dir, tmp_path):
    model = load(lm_dir)
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    healthy = Progress(step=40, train_loss=list(enumerate(FALLING, 1)))
    assert kinds(healthy, model) == []  # B = 0: no update at all
    randomise_lora(model, std=0.02)
    assert kinds(healthy, model) == ["full-rank"]  # random factors use every direction
    randomise_lora(model, std=1.0)
    found = lorakit.diagnose(healthy, model)
    assert found[0].kind == "exploding-norm" and "‖ΔW‖/‖W0‖" in found[0].message
    randomise_lora(model, std=0.02)
    lorakit.save_adapter(model, tmp_path / "ok")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.adapters["default"].lora_B.mul_(1000)
    lorakit.save_adapter(model, tmp_path / "outlier")
    assert kinds(healthy, tmp_path / "ok") == ["full-rank"]
    found = lorakit.diagnose(healthy, tmp_path / "outlier")
    assert found[0].kind == "exploding-norm" and "layers.1.mlp.down_proj" in found[0].message
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A[0, 0] = float("nan")
    assert kinds(healthy, model) == ["nan-weights"]
    lorakit.save_adapter(model, tmp_path / "nan")
    found = lorakit.diagnose(healthy, tmp_path / "nan")
    assert [f.kind for f in found] == ["nan-weights"] and "layers.0.self_attn.q_proj" in found[0].message


def test_low_rank_stats_match_the_full_update():
    g = torch.Generator().manual_seed(0)
    for r in (1, 3, 8):
        A = torch.randn(r, 96, generator=g)
        B = torch.randn(40, r, generator=g) * torch.logspace(0, -2, r)
        delta = B @ A
        norm, used = low_rank_stats(A, B)
        assert norm == pytest.approx(float(delta.norm()), rel=1e-4) and used == effective_rank(delta)
