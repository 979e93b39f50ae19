"""`lorakit train --method vera`: a VeRA adapter trains with the same loop, is saved in PEFT's VERA format,
resumes exactly, and takes VeRA's own defaults for --rank and --lr."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import build_parser
from lorakit.errors import ConfigError
from lorakit.train.cli import config_from_args
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

from ..conftest import load
from .helpers import letter_rows, write_jsonl


def vera_cfg(base, data, out, **kw):
    defaults = dict(base=str(base), data=str(data), out=str(out), method="vera", rank=32, max_steps=6, batch_size=8,
                    lr=3e-2, targets="all-linear", eval_fraction=0.2, seed=1, exact_match=False)
    return TrainConfig(**{**defaults, **kw})


def test_vera_trains_saves_peft_format_and_resumes_exactly(lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "l.jsonl", letter_rows(80))
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    result = train(vera_cfg(lm_dir, data, straight, save_every=2))
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["method"] == "vera" and metrics["train_loss"][-1][1] < metrics["train_loss"][0][1]
    assert metrics["trainable_params"] == lorakit.trainable_parameters(result.model, verbose=False).trainable
    assert json.loads((straight / "adapter_config.json").read_text())["peft_type"] == "VERA"
    tensors = load_file(straight / "adapter_model.safetensors")
    assert tensors["base_model.vera_A"].shape == (32, 128) and all("lora_" not in k for k in tensors)
    again = lorakit.load_adapter(load(lm_dir), straight)
    tokens = torch.tensor([[1, 60, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, result.model(tokens).logits, atol=1e-5, rtol=0)
    # killed after the step-4 checkpoint: resuming restores λ (and the projections) and ends bit-identical
    train(vera_cfg(lm_dir, data, cut, save_every=2))
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    (cut / "adapter_model.safetensors").unlink()
    train(vera_cfg(lm_dir, data, cut, save_every=2, resume=True))
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vera_defaults_and_refusals(lm_dir, tmp_path, monkeypatch):
    def parse(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    common = ["--base", str(lm_dir), "--data", str(tmp_path / "d.jsonl")]
    assert (parse(*common, "--method", "vera").rank, parse(*common, "--method", "vera").lr) == (256, 3e-2)
    assert parse(*common, "--method", "vera", "--rank", "64", "--lr", "3e-3").rank == 64
    assert parse(*common).rank == 8  # other methods keep theirs
    import lorakit.train.builtin as builtin

    monkeypatch.setattr(builtin, "default_model_dir", lambda: lm_dir)
    demo = parse("--method", "vera")  # over the demo's LoRA settings too; its targets and steps stay
    assert (demo.rank, demo.lr, demo.max_steps, demo.layers_to_transform) == (256, 3e-2, 60, list(range(18, 30)))
    with pytest.raises(ConfigError, match="alpha, lora_plus_ratio: plain-LoRA setting"):
        parse(*common, "--method", "vera", "--alpha", "32", "--lora-plus-ratio", "16")
