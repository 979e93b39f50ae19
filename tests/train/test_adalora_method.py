"""`lorakit train --method adalora`: the allocator and the regulariser run every step, the final total rank is
the budget, the output is PEFT's ADALORA adapter, and a resumed run equals a straight one."""

import json
import shutil

import torch
from safetensors.torch import load_file

import lorakit
from lorakit.state import adapter_layers
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

from ..conftest import load
from .helpers import letter_rows, write_jsonl


def cfg(base, data, out, **kw):
    defaults = dict(base=str(base), data=str(data), out=str(out), method="adalora", max_steps=12, batch_size=8,
                    lr=3e-3, rank=4, targets=["q_proj", "v_proj", "up_proj"], eval_fraction=0.2, seed=1)
    return TrainConfig(**{**defaults, **kw})


def test_final_total_rank_is_the_budget_and_peft_loads_it(lm_dir, tmp_path):
    from peft import PeftModel

    data = write_jsonl(tmp_path / "l.jsonl", letter_rows(80))
    result = train(cfg(lm_dir, data, tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and (saved["init_r"], saved["target_r"]) == (6, 4)
    assert (saved["total_step"], saved["tinit"], saved["tfinal"]) == (12, 1, 2)
    layers = list(adapter_layers(result.model, "default"))
    assert len(layers) == 6 and sum(a.rank for _, _, a in layers) == 4 * 6  # target_r × layers
    assert sum(map(sum, saved["rank_pattern"].values())) == 4 * 6
    tensors = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_E")) == 4 * 6
    tokens = torch.tensor([[1, 60, 30, 40]])
    with torch.no_grad():
        expected = result.model(tokens).logits
        peft_model = PeftModel.from_pretrained(load(lm_dir), tmp_path / "run").eval()
        torch.testing.assert_close(peft_model(tokens).logits, expected, atol=1e-5, rtol=0)
        again = lorakit.load_adapter(load(lm_dir), tmp_path / "run")
        torch.testing.assert_close(again(tokens).logits, expected, atol=1e-5, rtol=0)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "adalora" and metrics["final"]["eval_loss"] < metrics["train_loss"][0][1]


def test_resume_continues_the_allocator_exactly(lm_dir, tmp_path, capsys):
    """Resumed at step 9 (budget phase), the final pruning at step 10 uses the restored moving averages."""
    data = write_jsonl(tmp_path / "l.jsonl", letter_rows(80))
    straight = train(cfg(lm_dir, data, tmp_path / "a", save_every=3))
    train(cfg(lm_dir, data, tmp_path / "b", save_every=3))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000012")
    capsys.readouterr()
    resumed = train(cfg(lm_dir, data, tmp_path / "b", save_every=3, resume=True))
    assert "step-000009 (step 9)" in capsys.readouterr().out and resumed.progress.step == 12
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for (_, _, x), (_, _, y) in zip(adapter_layers(straight.model, "default"), adapter_layers(resumed.model, "default")):
        assert torch.equal(x.lora_A, y.lora_A) and torch.equal(x.rank_mask, y.rank_mask)
