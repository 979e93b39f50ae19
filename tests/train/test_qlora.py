"""`lorakit train --quantize nf4`: QLoRA end to end on a tiny model, with its memory savers (gradient checkpointing,
8-bit and paged optimizers, LoftQ) and the settings it refuses."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

from .helpers import letter_rows, write_jsonl

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:merging into quantised weights")


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("qdata") / "letters.jsonl", letter_rows(80))


def test_train_quantize_nf4_end_to_end(lm_dir, letters, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--base", str(lm_dir), "--data", str(letters), "--out", str(out), "--quantize", "nf4",
            "--optim", "paged_adamw8bit", "--max-steps", "16", "--save-every", "8", "--lr", "1e-2", "--targets",
            "all-linear", "--eval-fraction", "0.2", "--seed", "1", "--compare-base"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "paged_adamw8bit" in said and "using adamw8bit" in said  # no paging on a CPU: said, then the unpaged one
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert config["quantize"] == "nf4" and config["gradient_checkpointing"] is True  # on by default with --quantize
    assert metrics["final"]["eval_loss"] < 0.8 * metrics["base"]["eval_loss"]
    assert metrics["peak_memory_bytes"] > 0 and metrics["trainable_params"] == 2 * 8 * (128 * 2 + 96 * 2 + 192 * 2 + 192)
    optimizer = torch.load(out / "checkpoints" / "step-000016" / "optimizer.pt", weights_only=True)
    assert all("__bnb_optimizer_quant_state__" in s for s in optimizer["state"].values())  # bitsandbytes ran
    # (it keeps tensors under 4096 elements, all of this tiny model's, in fp32; larger ones in 8 bits)
    # the adapter is an ordinary PEFT adapter for the 4-bit base; merged with --quantize it is the trained model
    model = lorakit.load_adapter(lorakit.load_base_model(lm_dir, quantize="nf4").eval(), out)
    tokens = torch.tensor([[1, 60, 30, 40, 2]])
    with torch.no_grad():
        adapted = model(tokens).logits
    assert main(["merge", "--base", str(lm_dir), "--adapter", str(out), "--quantize", "nf4", "--out", str(tmp_path / "m")]) == 0
    merged = lorakit.load_base_model(tmp_path / "m").eval()
    assert not lorakit.quant.is_quantized(merged) and load_file(tmp_path / "m" / "model.safetensors")[
        "model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, adapted, atol=1e-5, rtol=0)


def test_train_with_loftq_init_starts_from_the_fitted_adapter(lm_dir, letters, tmp_path):
    from lorakit.quant.loftq import OriginalWeights

    result = train(TrainConfig(base=str(lm_dir), data=str(letters), out=str(tmp_path / "r"), quantize="nf4",
                               init="loftq", max_steps=1, lr=1e-12, targets="all-linear", eval_fraction=0.2, seed=1,
                               exact_match=False))
    # lr ~ 0: the saved adapter is LoftQ's initialisation, which cancels part of each layer's rounding error
    originals = OriginalWeights(result.model)
    for name, layer in lorakit.state.lora_layers(result.model):
        in_f, out_f = layer.features
        error = originals.get(name, (out_f, in_f)).float() - layer.type.dense_weight(layer.base_layer)
        with torch.no_grad():
            assert (error - layer.adapters["default"].delta_weight(layer)).norm() < 0.95 * error.norm()
    assert json.loads((tmp_path / "r" / "adapter_config.json").read_text())["init_lora_weights"] is True


@pytest.mark.parametrize("flags, message", [
    (["--init", "loftq"], "--init loftq .* add --quantize nf4"),
    (["--method", "full", "--quantize", "nf4"], "--quantize: LoRA setting"),
])
def test_qlora_settings_refused_where_they_cannot_apply(lm_dir, letters, tmp_path, flags, message, capsys):
    assert main(["train", "--base", str(lm_dir), "--data", str(letters), "--out", str(tmp_path / "r"), *flags]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    with pytest.raises(ConfigError, match="quantize must be one of"):
        TrainConfig(quantize="nf2")
