"""LoraConfig's warnings on the write-ups' common mistakes: alpha/r at or above 16 or at or below 1/8, r above a
layer's width (at inject), dropout on tiny data (lorakit train); each fires on the mistake and not on sane configs,
and configs read from adapter files or copied by the library stay quiet."""

import warnings

import pytest

import lorakit
from lorakit import LoraConfig
from lorakit.config import check_dropout_for_data
from lorakit.errors import ConfigWarning
from lorakit.variants import config_from_peft

from .conftest import load


def config_warnings(make) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
    return [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


@pytest.mark.parametrize("kwargs, shown, fix", [
    ({"r": 8, "alpha": 128}, "alpha/r = 128/8 = 16", "alpha=16"),
    ({"r": 1}, "alpha/r = 16/1 = 16", "alpha=2"),  # the default alpha with r=1
    ({"r": 8, "alpha": 1}, "alpha/r = 1/8 = 0.125", "set alpha = 2*r (alpha=16)"),
    ({"r": 64, "alpha": 4}, "alpha/r = 4/64 = 0.0625", "rslora=True"),
    ({"r": 64, "alpha": 128, "rslora": True}, "alpha/sqrt(r) = 128/sqrt(64) = 16", "alpha = 2*sqrt(r) (alpha=16)"),
    ({"r": 8, "alpha": 16, "alpha_pattern": {"q_proj": 256}}, "alpha/r = 256/8 = 32 for 'q_proj'", "alpha=16"),
])
def test_scale_mistakes_warn_with_the_fix(kwargs, shown, fix):
    [message] = config_warnings(lambda: LoraConfig(**kwargs))
    assert shown in message and fix in message
    assert ("rslora=True" in message) == (kwargs.get("r") == 64 and not kwargs.get("rslora"))  # for large ranks only


@pytest.mark.parametrize("kwargs", [{}, {"r": 16, "alpha": 16}, {"r": 1, "alpha": 2}, {"r": 64, "alpha": 16},
                                    {"r": 64, "alpha": 16, "rslora": True}, {"r": 8, "alpha": 120},
                                    {"r": 8, "rank_pattern": {"q_proj": 64}}])
def test_sane_configs_do_not_warn(kwargs):
    assert config_warnings(lambda: LoraConfig(**kwargs)) == []


def test_the_warning_points_at_the_callers_line():
    with pytest.warns(ConfigWarning) as record:
        LoraConfig(r=8, alpha=200)
    assert record[0].filename == __file__


def test_adapter_files_and_internal_copies_do_not_warn():
    peft = {"peft_type": "LORA", "r": 64, "lora_alpha": 4, "target_modules": ["q_proj"]}  # trained already: no advice
    assert config_warnings(lambda: config_from_peft(peft)) == []
    loud = config_warnings(lambda: LoraConfig(r=64, alpha=4))
    quiet_copy = config_warnings(lambda: LoraConfig(r=64, alpha=128).replace(alpha=4))
    assert len(loud) == 1 and quiet_copy == []


def test_rank_above_the_layers_width_warns_at_inject_naming_the_layer(llama):
    # the tiny Llama's k_proj and v_proj are 64 -> 32 (2 KV heads of 16); q_proj is 64 -> 64
    [message] = config_warnings(lambda: lorakit.inject(llama, LoraConfig(r=48, alpha=96, target_modules="all-linear")))
    assert "model.layers.0.self_attn.k_proj (r=48, min(in, out) = 32)" in message
    assert "4 layer(s)" in message and "rank_pattern={'k_proj': 32, 'v_proj': 32}" in message


def test_rank_at_the_layers_width_does_not_warn(llama):
    assert config_warnings(lambda: lorakit.inject(llama, LoraConfig(r=32, alpha=64, target_modules="all-linear"))) == []


def test_loading_an_adapter_with_rank_above_width_does_not_warn(llama, llama_dir, tmp_path):
    with pytest.warns(ConfigWarning):
        lorakit.inject(llama, LoraConfig(r=48, alpha=96, target_modules=["k_proj"]))
    lorakit.save_adapter(llama, tmp_path / "a")
    assert config_warnings(lambda: lorakit.load_adapter(load(llama_dir), tmp_path / "a")) == []


def test_dropout_on_tiny_data_warns_and_sane_data_does_not():
    with pytest.warns(ConfigWarning, match="dropout 0.1 with only 64 training rows.*--dropout 0"):
        check_dropout_for_data(0.1, 64)
    assert config_warnings(lambda: check_dropout_for_data(0.1, 5000)) == []
    assert config_warnings(lambda: check_dropout_for_data(0.0, 10)) == []


def test_lorakit_train_warns_about_dropout_on_tiny_data(lm_dir, tmp_path):
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    from .train.helpers import letter_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", letter_rows(40))
    config = TrainConfig(base=str(lm_dir), data=str(data), out=str(tmp_path / "run"), dropout=0.1, max_steps=1,
                         batch_size=4, exact_match=False)
    with pytest.warns(ConfigWarning, match="only 36 training rows"):
        train(config)
