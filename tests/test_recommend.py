"""`lorakit recommend` / recommend_config: valid configs for every task and priority (they build and inject on a tiny
model, and lorakit train accepts them), reasons that name a measured cell and its number or say they are a prior,
the plain message when even QLoRA cannot fit, and the study data export."""

import json
import re
import shlex
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import lorakit
from lorakit.cli import build_parser, main
from lorakit.errors import ConfigError, ConfigWarning
from lorakit.recommend import Study, recommend_config
from lorakit.recommend.export import export_study
from lorakit.train.config import TrainConfig, read_config_file
from lorakit.train.cli import config_from_args

from .conftest import llama_config, load

README = Path(__file__).resolve().parent.parent / "README.md"
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEMO = {"method": "lora", "rank": 8, "alpha": 16, "targets": SEVEN, "layers_to_transform": [1], "lr": 1e-3,
        "schedule": "linear", "warmup_steps": 5, "batch_size": 16, "grad_accum": 1, "max_steps": 60, "dropout": 0.0}


def cell(task, tables, score, seed=0, step=1.8, peak=1.4e9, trainable=976_896, **changes):
    return {"task": task, "seed": seed, "flags": "", "tables": tables, "status": "done", "score": score,
            "metric": "exact_match" if task == "causal-lm" else "accuracy", "eval_rows": 120, "train_rows": 960,
            "date": "2026-11-25 14:56", "machine": "2-core test CPU", "model": "tiny", "data": "letters.jsonl",
            "trainable_params": trainable, "total_params": 135_491_904, "peak_memory_bytes": peak,
            "step_cpu_seconds_median": step, "settings": {**DEMO, **changes}}


def synthetic_study(full_score=0.86):
    """Numbers chosen so each decision has a clear answer (they are test fixtures, not evidence)."""
    c, k = "causal-lm", "classify"
    cells = {
        "lora-r8-s0": cell(c, {"headline": "LoRA r=8", "rank": 8, "alpha": 16, "lr": 1e-3, "targets": "all linear r=8",
                               "method": "LoRA"}, 0.84),
        "lora-r8-s1": cell(c, {"headline": "LoRA r=8"}, 0.82, seed=1),
        "full-s0": cell(c, {"headline": "full FT"}, full_score, method="full", lr=1e-4, trainable=135_491_904, peak=3e9),
        "full-s1": cell(c, {"headline": "full FT"}, full_score, seed=1, method="full", lr=1e-4, trainable=135_491_904,
                        peak=3e9),
        "lora-r1": cell(c, {"rank": 1}, 0.70, rank=1, alpha=2),
        "lora-r4": cell(c, {"rank": 4}, 0.83, rank=4, alpha=8),
        "lora-r16": cell(c, {"rank": 16}, 0.86, rank=16, alpha=32),
        "lora-qv-r24": cell(c, {"targets": "q,v r=24"}, 0.80, rank=24, alpha=48, targets=["q_proj", "v_proj"], step=1.5),
        "lora-qkvo-r16": cell(c, {"targets": "q,k,v,o r=16"}, 0.79, rank=16, alpha=32, targets=SEVEN[:4], step=1.6),
        "lora-a1": cell(c, {"alpha": 1}, 0.60, alpha=1),
        "lora-a8": cell(c, {"alpha": 8}, 0.83, alpha=8),
        "lora-a128": cell(c, {"alpha": 128}, 0.30, alpha=128),
        "lora-lr1e-4": cell(c, {"lr": 1e-4}, 0.50, lr=1e-4),
        "lora-lr2e-4": cell(c, {"lr": 2e-4}, 0.70, lr=2e-4),
        "qlora": {"task": c, "seed": 0, "flags": "--quantize nf4", "tables": {"method": "QLoRA"}, "status": "pending"},
        "cls-lora-r8-s0": cell(k, {"cls-headline": "LoRA r=8 (q,v)", "cls-rank": 8}, 0.90, targets=["q_proj", "v_proj"],
                               layers_to_transform=None),
        "cls-lora-r2": cell(k, {"cls-rank": 2}, 0.89, rank=2, alpha=4, targets=["q_proj", "v_proj"],
                            layers_to_transform=None),
        "cls-full-s0": {"task": k, "seed": 0, "flags": "--method full", "tables": {"cls-headline": "full FT"},
                        "status": "not run"},
    }
    return Study({"exported": "2026-11-25 15:00", "cells": cells})


def finished(study):
    return {name for name, c in study.cells.items() if c["status"] == "done"}


def assert_reasons_cite(rec, study):
    """Every reason from the study names a finished cell and a number; every other one is a plan or a stated prior."""
    for s in rec.settings:
        if "study" in s.source:
            assert any(name in s.reason for name in finished(study)), (s.name, s.reason)
            assert re.search(r"\d\.\d{3}", s.reason), (s.name, s.reason)
        if "prior" in s.source:
            assert "prior" in s.reason, (s.name, s.reason)
        if "plan" in s.source:
            assert "memory plan" in s.reason and re.search(r"\d (GiB|MiB)", s.reason), (s.name, s.reason)
        assert s.source in ("study", "plan", "prior", "study+plan", "study+prior", "prior+plan"), s.source


def no_config_warnings(make):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = make()
    assert [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)] == []
    return result


@pytest.mark.parametrize("task", ["causal-lm", "classify"])
@pytest.mark.parametrize("priority", ["quality", "speed", "memory"])
def test_every_task_and_priority_gives_a_config_that_trains(llama_dir, task, priority):
    study = synthetic_study()
    rec = no_config_warnings(lambda: recommend_config(llama_dir, task=task, examples=2000, memory_gb=8,
                                                      priority=priority, device="cpu", study=study))
    assert rec.fits and rec.memory_note is None
    TrainConfig(**rec.train_config())
    assert_reasons_cite(rec, study)
    if rec.lora is not None:
        from transformers import LlamaForSequenceClassification

        model = load(llama_dir) if task == "causal-lm" else LlamaForSequenceClassification(llama_config())
        no_config_warnings(lambda: lorakit.inject(model, rec.lora, strict=True))
        assert 0 < lorakit.trainable_parameters(model, verbose=False).trainable
    # the printed command is what lorakit train parses into the same settings
    args = build_parser().parse_args(shlex.split(rec.command("d.jsonl"))[1:])
    parsed = config_from_args(args)
    for key, value in rec.train_config().items():
        assert getattr(parsed, key) == (value if key != "base" else str(llama_dir)), key


def test_decisions_follow_the_measurements(llama_dir):
    study = synthetic_study()
    quality = recommend_config(llama_dir, examples=2000, memory_gb=8, priority="quality", device="cpu", study=study)
    t = quality.train_config()
    # full FT 0.86 vs LoRA 0.83 is inside the noise band (2 x SE on 120 rows = 0.069): LoRA
    assert t["method"] == "lora" and "as good within the noise band" in quality.setting("method").reason
    assert t["targets"] == "all-linear" and t["rank"] == 16  # best targets row, best rank in the sweep
    assert t["alpha"] == 32 and "alpha/r = 2" in quality.setting("alpha").reason  # α=16 best at r=8: 2r
    assert t["lr"] == 1e-3 and "lora-lr2e-4" in quality.setting("lr").reason
    assert t["layers_to_transform"] is None and t["dropout"] == 0.0
    assert t["batch_size"] * t["grad_accum"] == 16 and t["gradient_checkpointing"] is False
    speed = recommend_config(llama_dir, examples=2000, memory_gb=8, priority="speed", device="cpu", study=study)
    s = speed.train_config()
    # q,v r=24 is within the band of the best and has the fastest step: its targets and matched rank
    assert s["targets"] == ["q_proj", "v_proj"] and s["rank"] == 24 and "fastest step" in speed.setting("targets").reason
    assert s["layers_to_transform"] == [1]  # the study's top share of blocks (1 of 2 here)
    memory = recommend_config(llama_dir, examples=2000, memory_gb=8, priority="memory", device="cpu", study=study)
    assert memory.setting("quantisation").value == "nf4 (QLoRA)" and memory.train_config()["gradient_checkpointing"]
    assert "not measured yet" in memory.setting("quantisation").reason and "qlora" in memory.setting("quantisation").reason


def test_full_fine_tuning_when_measured_better_and_it_fits(llama_dir):
    study = synthetic_study(full_score=0.99)
    rec = recommend_config(llama_dir, examples=2000, memory_gb=8, priority="quality", device="cpu", study=study)
    assert rec.train_config()["method"] == "full" and rec.lora is None and "rank" not in rec.train_config()
    assert "above the noise band" in rec.setting("method").reason
    TrainConfig(**rec.train_config())
    tight = recommend_config(llama_dir, examples=2000, memory_gb=0.005, priority="quality", device="cpu", study=study)
    assert tight.train_config()["method"] == "lora" and "full FT peaks at" in tight.setting("method").reason


def test_without_measurements_every_reason_is_a_stated_prior(llama_dir):
    rec = recommend_config(llama_dir, examples=100, priority="quality", device="cpu", study=Study({}))
    assert all("prior" in s.source or s.source == "plan" for s in rec.settings)
    assert "not measured yet" in rec.setting("rank").reason and rec.train_config()["rank"] == 8
    assert "warns about dropout under 500 rows" in rec.setting("dropout").reason
    TrainConfig(**rec.train_config())


def test_the_shipped_study_data_is_cited_by_name(llama_dir):
    study = Study.load()
    rec = recommend_config(llama_dir, examples=5000, memory_gb=4, priority="speed", device="cpu", study=study)
    assert_reasons_cite(rec, study)
    text = rec.format()
    for name in rec.study.cited:  # each cited cell's date, machine, model and data are printed
        c = study.cells[name]
        assert f"{name}: {c['date']}, {c['model']}" in text.replace("\n      ", " ")


def test_70b_in_4_gib_says_plainly_that_even_qlora_cannot_fit():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=32000, dtype="bfloat16")
    rec = recommend_config(config, examples=10_000, memory_gb=4, device="cuda", study=synthetic_study())
    assert not rec.fits
    assert rec.memory_note.startswith("4 GiB cannot fit even QLoRA of this 69B-parameter model: its 4-bit weights "
                                      "alone are 33.9 GiB")
    assert "smaller model" in rec.memory_note and rec.format().count("cannot fit even QLoRA") == 1
    assert rec.setting("quantisation").value == "nf4 (QLoRA)" and rec.train_config()["batch_size"] == 1
    TrainConfig(**rec.train_config())  # it still recommends the smallest setup
    assert "x larger usually wants a lower lr (prior)" in rec.setting("lr").reason  # a 135M model's lr, caveated


def test_the_builtin_model_without_examples_plans_for_the_bundled_data(builtin_cache):
    rec = recommend_config("builtin", device="cpu", study=synthetic_study())
    assert rec.bundled and rec.examples == 1080 and "--data" not in rec.command()
    assert rec.train_config()["base"] == "builtin"
    mine = recommend_config("builtin", examples=5000, device="cpu", study=synthetic_study())
    assert not mine.bundled and "--data DATA.jsonl" in mine.command()


def test_bad_requests_are_refused_by_name(llama_dir):
    for kwargs, match in [({"priority": "cheap"}, "priority"), ({"task": "seq2seq"}, "task"),
                          ({"examples": 0}, "examples"), ({"memory_gb": -1}, "memory_gb")]:
        with pytest.raises(ConfigError, match=match):
            recommend_config(llama_dir, device="cpu", study=Study({}), **kwargs)


def test_cli_prints_the_reasons_and_writes_a_train_config(llama_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 300)
    out = tmp_path / "run.yaml"
    assert main(["recommend", "--model", str(llama_dir), "--data", str(data), "--memory-gb", "2", "--device", "cpu",
                 "--write", str(out)]) == 0
    text = capsys.readouterr().out
    assert "300 examples" in text and "run it:" in text and f"--data {data}" in text
    values = read_config_file(out)
    assert values["data"] == str(data) and values["base"] == str(llama_dir)
    TrainConfig(**values)


def test_export_reads_the_studys_results_directory(tmp_path):
    results = tmp_path / "results"
    (results / "cells" / "a").mkdir(parents=True)
    (results / "records").mkdir()
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n" * 100)
    metrics = {"final": {"exact_match": 0.75, "eval_loss": 0.5}, "base": {"exact_match": 0.2}, "trainable_params": 10,
               "total_params": 1000, "peak_memory_bytes": 5, "step_seconds_median": 2.0, "steps": 6, "train_loss": [[1, 2.0]],
               "config": {**DEMO, "base": "/x/SmolLM2-135M-Instruct-Q4_1-fp16", "data": str(data), "eval_fraction": 0.2,
                          "max_eval": 15, "task": "causal-lm"}}
    (results / "cells" / "a" / "metrics.json").write_text(json.dumps(metrics))
    (results / "records" / "a.json").write_text(json.dumps({"status": "done", "started": 1.7e9, "seconds": 60}))
    (results / "records" / "b.json").write_text(json.dumps({"status": "pending", "reason": "no --method dora"}))
    cells = [SimpleNamespace(name="a", task="causal-lm", seed=0, flags="", rows={"rank": 8}),
             SimpleNamespace(name="b", task="causal-lm", seed=0, flags="--method dora", rows={"method": "DoRA"}),
             SimpleNamespace(name="c", task="classify", seed=1, flags="", rows={})]
    out = export_study(cells, results)["cells"]
    a = out["a"]
    assert (a["status"], a["score"], a["base_score"], a["train_rows"], a["eval_rows"]) == ("done", 0.75, 0.2, 85, 15)
    assert a["model"].startswith("SmolLM2-135M-Instruct") and a["data"] == "rows.jsonl" and a["tables"] == {"rank": 8}
    assert a["settings"]["rank"] == 8 and a["date"].startswith("2023-11-1") and "core" in a["machine"]
    assert "train_loss" not in a
    assert out["b"] == {"task": "causal-lm", "seed": 0, "flags": "--method dora", "tables": {"method": "DoRA"},
                        "status": "pending", "reason": "no --method dora"}
    assert out["c"]["status"] == "not run"
    study = Study({"cells": out})
    _, [point] = study.table("causal-lm", "rank")
    assert point.text() == "0.750 exact match (a)"


def test_the_starting_lora_config_is_rec_config_as_documented(llama_dir):
    from lorakit import LoraConfig

    rec = recommend_config(llama_dir, examples=2000, memory_gb=8, device="cpu", study=synthetic_study())
    assert isinstance(rec.config, LoraConfig) and rec.config is rec.lora
    assert rec.config.r == rec.train_config()["rank"] and rec.config.alpha == rec.train_config()["alpha"]
    model = load(llama_dir)
    lorakit.inject(model, rec.config, strict=True)
    assert lorakit.trainable_parameters(model, verbose=False).trainable > 0
    full = recommend_config(llama_dir, examples=2000, memory_gb=8, device="cpu", study=synthetic_study(full_score=0.99))
    assert full.config is None  # full fine-tuning: no adapter
    assert "`.config`" in recommend_config.__doc__ and "rec.config" in README.read_text()

