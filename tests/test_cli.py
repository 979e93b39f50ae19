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


def test_merge_keeps_the_base_dtype_unless_told(cli, llama_dir, tmp_path, tokens):
    import json

    from lorakit.hf import stored_dtype

    half = tmp_path / "half"  # stored in float16, loaded as float32: what the built-in model is
    load(llama_dir).to(torch.float16).save_pretrained(half)
    config = json.loads((half / "config.json").read_text())
    (half / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    adapted = make_adapter(half, tmp_path / "a")
    assert cli("merge", "--base", half, "--adapter", tmp_path / "a", "--out", tmp_path / "m")[0] == 0
    assert stored_dtype(tmp_path / "m") == torch.float16
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert abs(size - (half / "model.safetensors").stat().st_size) < 4096
    merged = load(tmp_path / "m")
    assert merged.dtype == torch.float32  # loads as the base does
    with torch.no_grad():  # fp32 merge, rounded once to fp16: as close as the fp16 base itself
        torch.testing.assert_close(merged(tokens).logits, adapted(tokens).logits, atol=2e-3, rtol=0)
    assert cli("merge", "--base", half, "--adapter", tmp_path / "a", "--out", tmp_path / "m32", "--dtype", "fp32")[0] == 0
    assert stored_dtype(tmp_path / "m32") == torch.float32


def test_merge_replaces_only_a_model_and_only_when_asked(cli, llama_dir, tmp_path):
    import os
    import stat

    make_adapter(llama_dir, tmp_path / "a")
    args = ["merge", "--base", llama_dir, "--adapter", tmp_path / "a", "--out"]
    old = os.umask(0o022)
    try:
        assert cli(*args, tmp_path / "m")[0] == 0
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    code, _, err = cli(*args, tmp_path / "m")
    assert code == 2 and "already exists; pass --overwrite" in err
    (tmp_path / "m" / "marker").write_text("old")
    assert cli(*args, tmp_path / "m", "--overwrite")[0] == 0 and not (tmp_path / "m" / "marker").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp or old directory left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    code, _, err = cli(*args, tmp_path / "notes", "--overwrite")
    assert code == 2 and "is not a model directory" in err and (tmp_path / "notes" / "todo.txt").exists()
    code, _, err = cli(*args, tmp_path, "--overwrite")
    assert code == 2 and "holds the adapter" in err


def test_inspect_fast_counts_layers_and_lists_them_in_numeric_order(cli, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)
    model = LlamaForCausalLM(config)
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    randomise_lora(model)
    lorakit.save_adapter(model, tmp_path / "a")
    code, out, _ = cli("inspect", tmp_path / "a", "--fast")
    assert code == 0 and "layers         12" in out
    code, out, _ = cli("inspect", tmp_path / "a", "--layers")
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  model.")]
    assert listed == [f"model.layers.{i}.self_attn.q_proj" for i in range(12)]


def test_generate_with_only_the_base(cli, lm_dir):
    code, out, _ = cli("generate", "--base", lm_dir, "--adapter", "base", "--prompt", "ab", "--max-new-tokens", "2")
    assert code == 0 and out.startswith("--- [base] 'ab'\n")


def test_generate_threads_sets_torch_threads_and_help_describes_it(cli, lm_dir):
    code, out, _ = cli("generate", "--help")
    assert code == 0 and "Generate text from a base model with an adapter" in out
    assert "--threads N" in out and "torch CPU threads for loading and generating" in out
    before = torch.get_num_threads()
    try:
        code, out, _ = cli("generate", "--base", lm_dir, "--prompt", "ab", "--max-new-tokens", "2", "--threads", "2")
        assert code == 0 and out.startswith("--- [base] 'ab'\n") and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "-1", "two"):  # argparse says so (torch.set_num_threads would raise a traceback)
        code, _, err = cli("generate", "--base", lm_dir, "--prompt", "ab", "--threads", bad)
        assert code == 2 and f"--threads: must be a positive number of CPU threads, got '{bad}'" in err
        code, _, err = cli("train", "--threads", bad)
        assert code == 2 and "--threads: must be a positive number" in err
    assert torch.get_num_threads() == before


def test_demo_fails_when_the_round_trip_does(cli):
    code, out, _ = cli("demo", "--steps", "0")  # nothing trained: the adapted loss cannot be lower
    assert code == 1 and "MISMATCH" in out
    code, out, _ = cli("demo", "--steps", "5")
    assert code == 0 and "OK: round trip" in out


def test_a_command_that_cannot_be_imported_says_why(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lorakit.train.cli", None)  # import of it fails
    code, out, _ = cli("--help")
    assert code == 0 and "(unavailable: importing lorakit.train.cli failed" in " ".join(out.split())
    code, _, err = cli("train", "--data", "x.jsonl")
    assert code == 2 and "importing lorakit.train.cli failed: ModuleNotFoundError" in err
    assert "pip install 'lorakit[train]'" in err


def test_version(cli):
    import transformers

    code, out, _ = cli("--version")
    want = f"lorakit {lorakit.__version__} (torch {torch.__version__}, transformers {transformers.__version__})\n"
    assert code == 0 and out == want
