"""`lorakit train` in the first hour: the mistakes users make, through the command line (exit code, no traceback,
the message), and what a run prints and leaves behind."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from .helpers import letter_rows, write_jsonl

STEPS = ["--max-steps", "2", "--batch-size", "8", "--lr", "3e-3", "--seed", "1", "--eval-fraction", "0.2"]


@pytest.fixture
def letters(tmp_path):
    return write_jsonl(tmp_path / "letters.jsonl", letter_rows(40))


def train(cli, base, data, out, *extra):
    return cli("train", "--base", base, "--data", data, "--out", out, *STEPS, *extra)


def modes(root):
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_a_run_says_what_it_adapted_and_wrote_and_writes_readable_files(cli, lm_dir, letters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        code, out, _ = cli("train", "--base", lm_dir, "--data", "letters.jsonl", "--out", "run", *STEPS)
    finally:
        os.umask(old)
    assert code == 0
    assert ("LoRA targets: q_proj, v_proj (this model family's default; choose with --targets) -> 4 modules in "
            "blocks 0-1: q_proj x2, v_proj x2") in out
    last = out.strip().splitlines()[-2:]
    assert last[0].startswith("wrote to run: adapter (PEFT format), best/ (step 2), checkpoints/{step-000002} (continue "
                              "with --resume and a larger --max-steps), metrics.json, loss.png, diagnostics.txt, "
                              "train_config.json")
    assert last[1] == f"base model: {lm_dir}"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]
    found = modes(tmp_path / "run")
    assert set(found.values()) == {0o644, 0o755} and found["adapter_model.safetensors"] == found["metrics.json"] == 0o644
    assert found["checkpoints/step-000002"] == found["best"] == 0o755
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["targets"] == ["q_proj", "v_proj"] and saved["data"] == str(tmp_path / "letters.jsonl")
    assert saved["adapted_modules"] == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]


def test_resume_with_nothing_to_resume_from_is_an_error(cli, lm_dir, letters, tmp_path):
    code, _, err = train(cli, lm_dir, letters, tmp_path / "run", "--resume")
    assert code == 2 and "--resume: nothing to resume, there is no checkpoint in" in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_a_second_run_into_the_same_out_needs_overwrite(cli, lm_dir, letters, tmp_path):
    out = tmp_path / "run"
    assert train(cli, lm_dir, letters, out)[0] == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    code, _, err = train(cli, lm_dir, letters, out, "--lr", "1e-2")
    assert code == 2 and "already holds a run (checkpoints up to step-000002); pass --resume" in err
    assert "--overwrite" in err and (out / "adapter_model.safetensors").read_bytes() == first
    code, _, err = train(cli, lm_dir, letters, out, "--resume", "--overwrite")
    assert code == 2 and "contradict" in err
    assert train(cli, lm_dir, letters, out, "--overwrite", "--max-steps", "1")[0] == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # the old run's are gone
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1


def test_a_finished_run_continues_with_a_larger_max_steps(cli, lm_dir, letters, tmp_path):
    assert train(cli, lm_dir, letters, tmp_path / "straight", "--max-steps", "4", "--schedule", "constant")[0] == 0
    assert train(cli, lm_dir, letters, tmp_path / "short", "--max-steps", "2", "--schedule", "constant")[0] == 0
    code, out, _ = cli("train", "--out", tmp_path / "short", "--resume", "--max-steps", "4")  # settings: the run's own
    assert code == 0 and "resumed from" in out and "(step 2)" in out
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("straight", "short"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = cli("train", "--out", tmp_path / "short", "--resume")
    assert code == 2 and "at step 4 already and --max-steps is 4; pass a larger --max-steps" in err


def test_bad_rows_stop_the_run_unless_skipped(cli, lm_dir, tmp_path):
    rows = [json.dumps(r) for r in letter_rows(40)]
    rows[2], rows[6] = "{broken", json.dumps({"prompt": "w: a\nc:"})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n")
    code, _, err = train(cli, lm_dir, data, tmp_path / "run")
    assert code == 2 and "2 bad row(s) (of 40)" in err and f"{data}:3: not valid JSON" in err
    assert f"{data}:7: needs 'messages'" in err and "--skip-bad-rows" in err and not (tmp_path / "run").exists()
    code, out, _ = train(cli, lm_dir, data, tmp_path / "run", "--skip-bad-rows")
    assert code == 0 and "skipped 2 bad row(s):" in out and f"{data}:3: not valid JSON" in out
    notes = (tmp_path / "run" / "diagnostics.txt").read_text()
    assert notes.startswith(f"Skipped 2 bad data row(s) (--skip-bad-rows): {data}:3: not valid JSON")
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_rows"]
    assert skipped["count"] == 2 and [r.split(": ")[0] for r in skipped["rows"]] == [f"{data}:3", f"{data}:7"]


def test_a_target_name_that_matches_nothing_is_an_error(cli, lm_dir, letters, tmp_path):
    code, _, err = train(cli, lm_dir, letters, tmp_path / "run", "--targets", "q_prj", "v_proj")
    assert code == 2 and "target_modules ['q_prj'] matched no module; candidates: embed_tokens, q_proj, k_proj" in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_epochs_and_a_held_out_file(cli, lm_dir, letters, tmp_path):
    held = write_jsonl(tmp_path / "held.jsonl", letter_rows(6))
    code, out, _ = cli("train", "--base", lm_dir, "--data", letters, "--eval-data", held, "--output-dir",
                       tmp_path / "run", "--epochs", "0.5", "--batch-size", "8", "--learning-rate", "3e-3",
                       "--lora-target-modules", "all-linear", "--layers", "1")
    assert code == 0 and "--epochs 0.5: 3 optimizer steps (40 training rows, 8 per step)" in out
    assert "40 training and 6 held-out examples" in out
    assert "LoRA targets: all-linear -> 7 modules in blocks 1: q_proj x1, k_proj x1" in out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3
    code, _, err = cli("train", "--base", lm_dir, "--data", letters, "--epochs", "1", "--max-steps", "3")
    assert code == 2 and "pass one of them" in err


def test_builtin_is_the_default_base_and_train_help_names_its_directory(cli, letters, tmp_path, builtin_cache,
                                                                          monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help lines at hyphens too
    code, out, _ = cli("train", "--help")
    assert code == 0 and f"converted once into {builtin_cache}" in out
    code, out, _ = cli("train", "--data", letters, "--out", tmp_path / "run", *STEPS)
    assert code == 0 and out.strip().splitlines()[-1] == f"base model: {builtin_cache} (--base builtin)"
    code, out, _ = cli("train", "--base", "builtin", "--data", letters, "--out", tmp_path / "run2", *STEPS)
    assert code == 0 and out.strip().splitlines()[-1] == f"base model: {builtin_cache} (--base builtin)"


@pytest.mark.parametrize("method, init, allowed", [("vera", "pissa", "kaiming"), ("adalora", "olora", "kaiming"),
                                                   ("dora", "pissa_niter_4", "kaiming | gaussian"),
                                                   ("dora", "loftq", "kaiming | gaussian")])
def test_an_init_the_method_does_not_support_is_an_error(cli, lm_dir, letters, tmp_path, method, init, allowed):
    code, _, err = train(cli, lm_dir, letters, tmp_path / "run", "--method", method, "--init", init)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--init {init} does not apply to --method {method}, which supports --init {allowed}" in err
    assert not (tmp_path / "run").exists()


def test_dora_refuses_the_inits_it_would_ignore_in_the_library_too():
    from lorakit import LoraConfig
    from lorakit.errors import ConfigError

    for init in ("pissa", "olora", "pissa_niter_2", "loftq"):
        with pytest.raises(ConfigError, match=f"init='{init}' does not combine with use_dora=True"):
            LoraConfig(use_dora=True, init=init)
    assert LoraConfig(use_dora=True, init="gaussian").method == "dora"
