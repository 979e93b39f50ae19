"""The training loop: it learns, writes its evidence, accumulates exactly, resumes bit-identically, stops on NaN."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError
from lorakit.train import loop as loop_mod
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

from ..conftest import load
from .helpers import class_rows, letter_rows, write_jsonl


@pytest.fixture
def letters(tmp_path):
    return write_jsonl(tmp_path / "letters.jsonl", letter_rows(80))


def cfg(base, data, out, **kw):
    defaults = dict(base=str(base), data=str(data), out=str(out), max_steps=12, batch_size=8, lr=3e-3,
                    targets="all-linear", eval_fraction=0.2, seed=1)
    return TrainConfig(**{**defaults, **kw})


def adapter_tensors(path):
    return load_file(path / "adapter_model.safetensors")


def test_run_learns_and_writes_its_evidence(lm_dir, letters, tmp_path):
    out = tmp_path / "run"
    result = train(cfg(lm_dir, letters, out, max_steps=30, save_every=10, eval_every=10, compare_base=True))
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "best", "checkpoints", "metrics.json", "loss.png",
            "train_config.json", "diagnostics.txt"} <= names
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 30 and len(metrics["train_loss"]) == 30
    first, last = metrics["train_loss"][0][1], metrics["final"]["eval_loss"]
    assert last < first * 0.9
    assert metrics["final"]["eval_loss"] < metrics["base"]["eval_loss"]
    assert "exact_match" in metrics["final"] and "perplexity" in metrics["final"]
    assert [e["step"] for e in metrics["eval"]] == [10, 20, 30]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    # the final adapter is an ordinary PEFT-format adapter
    again = lorakit.load_adapter(load(lm_dir), out)
    tokens = torch.tensor([[1, 60, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, result.model(tokens).logits, atol=1e-5, rtol=0)


def test_gradient_accumulation_matches_one_big_batch(lm_dir, letters, tmp_path):
    big = train(cfg(lm_dir, letters, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=6))
    small = train(cfg(lm_dir, letters, tmp_path / "b", batch_size=2, grad_accum=4, max_steps=6))
    assert big.progress.step == small.progress.step == 6
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


def test_resume_after_sigkill_is_bit_identical(lm_dir, letters, tmp_path):
    args = ["--base", str(lm_dir), "--data", str(letters), "--max-steps", "30", "--save-every", "3", "--lr", "3e-3",
            "--targets", "all-linear", "--eval-fraction", "0.2", "--seed", "1", "--dropout", "0.1", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a busy 2-core machine stalls 2-thread runs
    straight = tmp_path / "straight"
    assert subprocess.run([sys.executable, "-m", "lorakit", "train", *args, "--out", str(straight)],
                          capture_output=True, env=env).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000006").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()  # it really died before the end
    resumed = subprocess.run([sys.executable, "-m", "lorakit", "train", *args, "--out", str(killed), "--resume"],
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = adapter_tensors(straight), adapter_tensors(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    assert ma["train_loss"] == mb["train_loss"]


def test_refuses_to_overwrite_a_run(lm_dir, letters, tmp_path):
    train(cfg(lm_dir, letters, tmp_path / "r", max_steps=2, save_every=1))
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg(lm_dir, letters, tmp_path / "r", max_steps=2))


def test_nan_stops_and_keeps_the_last_good_adapter(lm_dir, letters, tmp_path, monkeypatch):
    real = loop_mod.loss_fn

    def poisoned(task):
        fn, calls = real(task), {"n": 0}

        def wrapped(model, batch):
            calls["n"] += 1
            loss, n = fn(model, batch)
            return (loss * float("nan"), n) if calls["n"] >= 5 else (loss, n)
        return wrapped

    monkeypatch.setattr(loop_mod, "loss_fn", poisoned)
    result = train(cfg(lm_dir, letters, tmp_path / "n", max_steps=10, save_every=2))
    assert result.progress.step == 4 and "NaN at step 5" in result.progress.stopped_reason
    saved = adapter_tensors(tmp_path / "n")
    assert all(torch.isfinite(t).all() for t in saved.values())
    ckpt = adapter_tensors(tmp_path / "n" / "checkpoints" / "step-000004")
    assert all(torch.equal(saved[k], ckpt[k]) for k in saved)
    assert "NaN" in (tmp_path / "n" / "diagnostics.txt").read_text()


def test_classification_reports_accuracy_and_f1(cls_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", class_rows(80))
    result = train(cfg(cls_dir, data, tmp_path / "c", task="classify", targets=["query", "value"], max_steps=25,
                       lr=5e-3))
    assert result.metrics["accuracy"] > 0.9 and 0 <= result.metrics["f1_macro"] <= 1
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]


def test_config_file_flags_and_resolved_config(lm_dir, letters, tmp_path):
    from lorakit.cli import build_parser
    from lorakit.train.cli import config_from_args

    (tmp_path / "run.yaml").write_text(f"base: {lm_dir}\ndata: {letters}\nmax-steps: 3\nrank: 4\nlr: 0.01\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--rank", "2",
                                      "--out", str(tmp_path / "o")])
    config = config_from_args(args)
    assert (config.max_steps, config.rank, config.lr) == (3, 2, 0.01)
    (tmp_path / "run.toml").write_text('max_steps = 5\nschedule = "cosine"\n')
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.toml"), "--base", str(lm_dir),
                                      "--data", str(letters), "--out", str(tmp_path / "o")])
    config = config_from_args(args)
    assert (config.max_steps, config.schedule) == (5, "cosine")
    train(config)
    saved = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert saved["schedule"] == "cosine" and saved["max_steps"] == 5
    (tmp_path / "bad.yaml").write_text("max_stepz: 3\n")
    with pytest.raises(ConfigError, match="max_stepz"):
        config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "bad.yaml")]))


def test_lora_plus_schedule_and_checkpointing(lm_dir, letters, tmp_path):
    config = cfg(lm_dir, letters, tmp_path / "g", max_steps=4, lora_plus_ratio=16, schedule="cosine",
                 warmup_steps=2, gradient_checkpointing=True, precision="bf16")
    result = train(config)
    assert result.model.config.use_cache is True  # turned off while training, restored after
    assert not result.model.is_gradient_checkpointing
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result.progress.train_loss)
    model = load(lm_dir)
    lorakit.inject(model, lorakit.LoraConfig(target_modules="all-linear"))
    opt = loop_mod._optimizer(model, config)
    assert [g["lr"] for g in opt.param_groups] == [config.lr, config.lr * 16]
    assert all(p.ndim == 2 for p in opt.param_groups[1]["params"]) and len(opt.param_groups[1]["params"]) == 14
    f = loop_mod._schedule(config)
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0) and f(4) == pytest.approx(0.0, abs=1e-12)
