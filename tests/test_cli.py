"""The `lorakit` command: inspect and merge on real directories, errors as messages (exit code 2)."""

import subprocess
import sys

import torch

import lorakit
from lorakit import LoraConfig
from lorakit.cli import main

from .conftest import load, randomise_lora


def make_adapter(llama_dir, path):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomise_lora(model)
    lorakit.save_adapter(model, path)
    return model


def test_inspect(llama_dir, tmp_path, capsys):
    make_adapter(llama_dir, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "rank r         4" in out and "alpha          8" in out and "q_proj, v_proj" in out
    q, v = 4 * 64 + 64 * 4, 4 * 64 + 32 * 4  # v_proj maps 64 -> 32 (2 key/value heads of 16)
    assert f"parameters     {2 * (q + v):,}" in out and "KiB" in out
    assert "model.layers.1.self_attn.v_proj" in out and "effective=" in out


def test_merge_command_writes_a_plain_model(llama_dir, tmp_path, tokens):
    adapted = make_adapter(llama_dir, tmp_path / "a")
    assert main(["merge", "--base", str(llama_dir), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    merged = load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, adapted(tokens).logits, atol=1e-5, rtol=0)


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_entry_point_is_installed():
    out = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "inspect" in out and "merge" in out
