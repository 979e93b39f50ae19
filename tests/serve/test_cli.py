"""`lorakit serve`'s command line: vLLM's flag names work too, --max-lora-rank refuses bigger adapters, and
--help shows where it listens."""

import pytest

import lorakit
from lorakit import LoraConfig
from lorakit.cli import build_parser
from lorakit.errors import ConfigError, IncompatibleAdapterError
from lorakit.serve.cli import parse_adapters

from ..conftest import load


def test_vllm_flag_names(tmp_path):
    args = build_parser().parse_args(["serve", "--model", "m", "--enable-lora", "--lora-modules", "a=x",
                                      '{"name": "b", "path": "y/z", "base_model_name": "m"}', "--max-loras", "3",
                                      "--max-lora-rank", "16", "--served-model-name", "base"])
    assert (args.base, args.max_loaded, args.max_lora_rank, args.name) == ("m", 3, 16, "base")
    assert parse_adapters(args.adapters) == {"a": "x", "b": "y/z"}
    for bad in (['{"name": "b"}'], ["{oops"]):
        with pytest.raises(ConfigError, match="NAME=PATH|not valid JSON"):
            parse_adapters(bad)


def test_help_shows_host_and_port_defaults(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli("serve", "--help")
    assert code == 0 and "(default: 127.0.0.1, this machine only)" in out and "(default: 8000)" in out


def test_max_lora_rank_refuses_a_bigger_adapter(lm_dir, tmp_path):
    from lorakit.serve.server import _register_and_load, create_app

    for name, r in (("small", 4), ("big", 8)):
        model = load(lm_dir)
        lorakit.inject(model, LoraConfig(r=r, target_modules=["q_proj"]))
        lorakit.save_adapter(model, tmp_path / name)
    with pytest.raises(IncompatibleAdapterError, match="'big' has rank 8, above --max-lora-rank 4"):
        create_app(lm_dir, adapters={"small": str(tmp_path / "small"), "big": str(tmp_path / "big")}, max_lora_rank=4)
    app = create_app(lm_dir, adapters={"small": str(tmp_path / "small")}, adapter_root=tmp_path, max_lora_rank=4)
    store = app.state.lorakit.adapters
    with pytest.raises(IncompatibleAdapterError, match="rank 8"):  # POST /v1/adapters answers it as a 400
        _register_and_load(store, "big", "big", 4)
    assert store.names() == ["small"]
