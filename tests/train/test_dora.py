"""`lorakit train --method dora`: a DoRA adapter trains with the same loop, saves in PEFT's format and resumes exactly."""

import json

import torch
from safetensors.torch import load_file

from lorakit.cli import build_parser
from lorakit.train.cli import config_from_args
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

from ..conftest import load
from .helpers import letter_rows, write_jsonl


def cfg(base, data, out, **kw):
    defaults = dict(base=str(base), data=str(data), out=str(out), method="dora", max_steps=12, batch_size=8, lr=3e-3,
                    targets="all-linear", eval_fraction=0.2, seed=1, schedule="constant")
    return TrainConfig(**{**defaults, **kw})


def test_dora_run_learns_and_saves_a_peft_dora_adapter(lm_dir, tmp_path):
    from peft import PeftModel

    args = build_parser().parse_args(["train", "--base", str(lm_dir), "--data", "d.jsonl", "--method", "dora"])
    assert config_from_args(args).method == "dora"
    data = write_jsonl(tmp_path / "l.jsonl", letter_rows(80))
    out = tmp_path / "run"
    result = train(cfg(lm_dir, data, out, max_steps=16))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "dora" and metrics["final"]["eval_loss"] < 0.9 * metrics["train_loss"][0][1]
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(out / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 14 and len(tensors) == 3 * 14  # 2 blocks x 7 projections: A, B and m each
    theirs = PeftModel.from_pretrained(load(lm_dir), out).eval()
    tokens = torch.tensor([[1, 60, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, result.model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_dora_resume_is_bit_identical(lm_dir, tmp_path):
    """The magnitudes are restored with A and B (and the cached norms follow the restored factors)."""
    data = write_jsonl(tmp_path / "l.jsonl", letter_rows(80))
    train(cfg(lm_dir, data, tmp_path / "straight", max_steps=6, save_every=3, dropout=0.1))
    train(cfg(lm_dir, data, tmp_path / "resumed", max_steps=3, save_every=3, dropout=0.1))
    train(cfg(lm_dir, data, tmp_path / "resumed", max_steps=6, save_every=3, dropout=0.1, resume=True))
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
