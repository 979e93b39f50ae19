"""`lorakit train --method full`: every weight trains with the same loop; OUT is a model directory; resume is exact."""

import json
import os
import shutil
import stat

import pytest
import torch

from lorakit.cli import build_parser
from lorakit.errors import ConfigError
from lorakit.train.cli import config_from_args
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

from ..conftest import _save, llama_config, tiny_tokenizer
from .helpers import letter_rows, write_jsonl


@pytest.fixture(scope="module")
def tied_lm_dir(tmp_path_factory):
    """A tiny Llama whose output head is its embedding, as in the built-in SmolLM2 (save_pretrained writes it once)."""
    from transformers import LlamaForCausalLM

    config = llama_config()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    config.tie_word_embeddings = True
    path = _save(tmp_path_factory, "tied", lambda: LlamaForCausalLM(config))
    tiny_tokenizer().save_pretrained(path)
    return path


def full(base, data, out, **kw):
    defaults = dict(base=str(base), data=str(data), out=str(out), method="full", max_steps=12, batch_size=8, lr=3e-3,
                    eval_fraction=0.2, seed=1)
    return TrainConfig(**{**defaults, **kw})


def test_full_fine_tuning_trains_every_weight_and_writes_a_model(lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "l.jsonl", letter_rows(80))
    out = tmp_path / "run"
    result = train(full(lm_dir, data, out, max_steps=20, save_every=10, eval_every=10, compare_base=True))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "full" and metrics["trainable_params"] == metrics["total_params"] > 0
    assert metrics["final"]["eval_loss"] < 0.7 * metrics["base"]["eval_loss"]
    assert metrics["step_seconds_median"] > 0 and metrics["peak_memory_bytes"] > 10 * 2**20
    assert not any("trainable" in n for n in metrics["diagnostics"])  # 100% trainable is the point here
    assert not (out / "adapter_model.safetensors").exists()
    # OUT and best/ are ordinary model directories, tokenizer included
    again = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert AutoTokenizer.from_pretrained(out)("w: a").input_ids == tiny_tokenizer()("w: a").input_ids
    tokens = torch.tensor([[1, 60, 30, 40]])
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, result.model(tokens).logits)
    assert (out / "best" / "model.safetensors").exists() and (out / "best" / "config.json").exists()
    # the weights get a normal write's permissions too (safetensors creates its file 0600)
    mask = os.umask(0)
    os.umask(mask)
    for d in (out, out / "best"):
        assert stat.S_IMODE((d / "model.safetensors").stat().st_mode) == 0o666 & ~mask
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["method"] == "full" and "rank" not in saved  # usable as --config: no LoRA setting in it


def test_full_resume_is_bit_identical_with_tied_weights(tied_lm_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "l.jsonl", letter_rows(80))
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train(full(tied_lm_dir, data, straight, max_steps=6, save_every=2))
    train(full(tied_lm_dir, data, cut, max_steps=6, save_every=2))
    # as if killed after the step-4 checkpoint: the last checkpoint and the outputs never got written
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    for name in ("metrics.json", "model.safetensors", "config.json"):
        (cut / name).unlink()
    resumed = train(full(tied_lm_dir, data, cut, max_steps=6, save_every=2, resume=True))
    assert resumed.progress.step == 6 and len(resumed.progress.step_seconds) == 6
    a, b = load_file(straight / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.weight" not in a  # tied: written once
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, cut))
    assert ma["train_loss"] == mb["train_loss"]


def test_lora_settings_are_refused_with_method_full(lm_dir, tmp_path, monkeypatch):
    def parse(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    common = ["--base", str(lm_dir), "--data", str(tmp_path / "d.jsonl")]
    with pytest.raises(ConfigError, match="--rank, --targets: LoRA setting"):
        parse(*common, "--method", "full", "--rank", "8", "--targets", "q_proj")
    with pytest.raises(ConfigError, match="--lora-plus-ratio"):
        TrainConfig(method="full", lora_plus_ratio=16)
    with pytest.raises(ConfigError, match="method must be one of"):
        TrainConfig(method="lorax")
    (tmp_path / "run.yaml").write_text("method: full\nalpha: 32\n")
    with pytest.raises(ConfigError, match="--alpha"):
        parse(*common, "--config", str(tmp_path / "run.yaml"))
    # the built-in demo with --method full drops the demo's adapter settings instead of refusing them
    import lorakit.train.builtin as builtin

    monkeypatch.setattr(builtin, "default_model_dir", lambda: lm_dir)
    config = parse("--method", "full")
    assert config.method == "full" and config.targets is None and config.layers_to_transform is None
    assert (config.max_steps, config.lr, config.compare_base) == (60, 1e-3, True)


def test_split_seed_keeps_the_held_out_set_while_seed_varies(lm_dir, tmp_path):
    from lorakit.train.loop import _load_data
    from lorakit.hf import load_tokenizer

    data = write_jsonl(tmp_path / "l.jsonl", letter_rows(80))
    tok = load_tokenizer(lm_dir)

    def held_out(**kw):
        _, evals, _ = _load_data(full(lm_dir, data, tmp_path / "o", **kw), tok, say=lambda *a: None)
        return [e.line for e in evals.examples]

    assert held_out(seed=0) != held_out(seed=1)
    assert held_out(seed=1, split_seed=0) == held_out(seed=0)
