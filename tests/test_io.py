"""Adapter files: PEFT's exact format, round trips through PEFT both ways, and clear errors for bad files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterFileError, AdapterFileNotFoundError, IncompatibleAdapterError, ShapeMismatchError

from .conftest import load, randomise_lora

CASES = {
    "llama-all-linear": ("llama_dir", "causal", LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    "llama-rslora-patterns": ("llama_dir", "causal", LoraConfig(r=8, alpha=16, rslora=True, target_modules=["q_proj", "v_proj"],
                                                              rank_pattern={"v_proj": 4})),
    "llama-embedding": ("llama_dir", "causal", LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": ("gpt2_dir", "causal", LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj"])),
    "bert-cls": ("bert_dir", "cls", LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only")),
}


def ours_with_trained_adapter(path, kind, config):
    model = load(path, kind)
    lorakit.inject(model, config)
    randomise_lora(model)
    if config.task_type == "SEQ_CLS":
        with torch.no_grad():
            model.classifier.modules_to_save["default"].weight.normal_()
            model.bert.encoder.layer[0].attention.self.query.base_layer.bias.normal_()
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft(case, request, tmp_path, tokens):
    from peft import PeftModel

    fixture, kind, config = CASES[case]
    path = request.getfixturevalue(fixture)
    ours = ours_with_trained_adapter(path, kind, config)
    lorakit.save_adapter(ours, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(load(path, kind), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, ours(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_ours(case, request, tmp_path, tokens):
    import peft

    fixture, kind, config = CASES[case]
    path = request.getfixturevalue(fixture)
    pc = config.to_peft_dict()
    peft_config = peft.LoraConfig(r=pc["r"], lora_alpha=pc["lora_alpha"], target_modules=pc["target_modules"],
                                  use_rslora=pc["use_rslora"], rank_pattern=pc["rank_pattern"], bias=pc["bias"],
                                  task_type=pc["task_type"], init_lora_weights=False)
    peft_model = peft.get_peft_model(load(path, kind), peft_config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name or ("base_layer.bias" in name and config.bias != "none"):
                p.normal_()
    peft_model.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(load(path, kind), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, peft_model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_file_format_is_peft(llama, tmp_path):
    lorakit.inject(llama, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(llama, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["task_type"] == "CAUSAL_LM"
    assert "base_model_name_or_path" in cfg
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 8


def test_saved_targets_select_exactly_the_adapted_modules(bert_dir, tmp_path, tokens):
    """Leaf names are saved when they pick the same modules; otherwise full names, so PEFT adapts the same set."""
    from peft import PeftModel

    ours = load(bert_dir, "cls")
    lorakit.inject(ours, LoraConfig(r=4, target_modules=["attention.output.dense", "query"], layers_to_transform=[1]))
    randomise_lora(ours)
    lorakit.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.attention.self.query"]
    theirs = PeftModel.from_pretrained(load(bert_dir, "cls"), tmp_path).eval()
    adapted = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in theirs.named_modules()
                     if n.endswith(".lora_A"))
    assert adapted == sorted(cfg["target_modules"])
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, atol=1e-5, rtol=1e-5)


def test_round_trip_keeps_names_and_multiple_adapters(llama_dir, tmp_path, tokens):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), adapter="a")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["v_proj"]), adapter="b")
    randomise_lora(model)
    lorakit.save_adapter(model, tmp_path / "a", adapter="a")
    lorakit.save_adapter(model, tmp_path / "b", adapter="b")
    fresh = load(llama_dir)
    lorakit.load_adapter(fresh, tmp_path / "a", adapter="a")
    lorakit.load_adapter(fresh, tmp_path / "b", adapter="b")
    for name in ("a", "b"):
        lorakit.set_active(model, name)
        lorakit.set_active(fresh, name)
        with torch.no_grad():
            assert torch.equal(fresh(tokens).logits, model(tokens).logits)


def saved(llama_dir, tmp_path):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
    return lorakit.save_adapter(model, tmp_path / "a")


def test_missing_directory_and_files(llama, tmp_path, llama_dir):
    with pytest.raises(AdapterFileNotFoundError, match="does not exist"):
        lorakit.load_adapter(llama, tmp_path / "nope")
    d = saved(llama_dir, tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileNotFoundError, match="adapter_model.safetensors is missing"):
        lorakit.load_adapter(llama, d)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileNotFoundError, match="adapter_config.json is missing"):
        lorakit.load_adapter(llama, d)


def test_pickle_is_refused_with_a_way_out(llama, llama_dir, tmp_path):
    d = saved(llama_dir, tmp_path)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(AdapterFileNotFoundError, match="pickle"):
        lorakit.load_adapter(llama, d)


def test_corrupt_files_are_named(llama, llama_dir, tmp_path):
    d = saved(llama_dir, tmp_path)
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors.*corrupt"):
        lorakit.load_adapter(llama, d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="adapter_config.json.*not valid JSON"):
        lorakit.load_adapter(llama, d)
    assert lorakit.list_adapters(llama) == []


def test_other_architecture_is_refused(gpt2, llama_dir, tmp_path):
    d = saved(llama_dir, tmp_path)
    with pytest.raises(IncompatibleAdapterError, match="another architecture"):
        lorakit.load_adapter(gpt2, d)


def test_shape_mismatch_names_layer_and_shapes(llama, llama_dir, tmp_path):
    d = saved(llama_dir, tmp_path)
    f = d / "adapter_model.safetensors"
    tensors = load_file(f)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 32)
    save_file(tensors, f)
    with pytest.raises(ShapeMismatchError) as e:
        lorakit.load_adapter(llama, d)
    assert "model.layers.0.self_attn.q_proj" in str(e.value) and "(4, 32)" in str(e.value) and "(4, 64)" in str(e.value)
    assert lorakit.list_adapters(llama) == []  # nothing half-loaded


def test_not_lora_and_unsupported_configs(llama, llama_dir, tmp_path):
    d = saved(llama_dir, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(AdapterFileError, match="IA3"):
        lorakit.load_adapter(llama, d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_qalora": True}))
    with pytest.raises(AdapterFileError, match="use_qalora"):
        lorakit.load_adapter(llama, d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))  # DoRA without its magnitudes
    with pytest.raises(IncompatibleAdapterError, match="no lora_magnitude_vector for 'model.layers.0.self_attn.q_proj'"):
        lorakit.load_adapter(llama, d)
    assert lorakit.list_adapters(llama) == []


def test_save_is_atomic(llama, tmp_path, monkeypatch):
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.save_adapter(llama, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomise_lora(llama)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.io.save_file", boom)
    with pytest.raises(OSError):
        lorakit.save_adapter(llama, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# --- the one validator (io.check_adapter_files), used by load_adapter and the server's store ------------


def _saved(llama_dir, tmp_path, config=None):
    model = load(llama_dir)
    lorakit.inject(model, config or LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise_lora(model)
    return lorakit.save_adapter(model, tmp_path / "a")


def _rewrite(path, change):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


def test_check_reads_the_header_only_and_counts_bytes(llama, llama_dir, tmp_path, monkeypatch):
    d = _saved(llama_dir, tmp_path)
    from lorakit import io

    monkeypatch.setattr(io, "load_file", lambda *a, **k: pytest.fail("check_adapter_files read tensor data"))
    files = lorakit.check_adapter_files(d, llama)
    assert files.config.r == 4 and files.config.method == "lora"
    assert files.modules == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    # q_proj: A (4, 64) + B (64, 4); v_proj: A (4, 64) + B (32, 4) (2 kv heads of 16); fp32
    assert files.nbytes == 2 * 4 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert {t.name for t in files.tensors} == {"lora_A.weight", "lora_B.weight"}


def test_check_refuses_integer_tensors(llama, llama_dir, tmp_path):
    d = _saved(llama_dir, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite(d, lambda t: t.__setitem__(key, t[key].to(torch.int32)))
    with pytest.raises(AdapterFileError, match=r"q_proj.lora_A.weight.*dtype I32.*floating point"):
        lorakit.check_adapter_files(d, llama)


def test_check_names_a_rank_that_disagrees_with_the_config(llama, llama_dir, tmp_path):
    d = _saved(llama_dir, tmp_path)
    config = json.loads((d / "adapter_config.json").read_text())
    config["r"] = 8
    (d / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError, match=r"rank 4 but its config gives .*q_proj' rank 8"):
        lorakit.check_adapter_files(d, llama)


def test_check_finds_a_missing_factor(llama, llama_dir, tmp_path):
    d = _saved(llama_dir, tmp_path)
    _rewrite(d, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    with pytest.raises(IncompatibleAdapterError, match=r"no lora_B.weight for 'model.layers.1.self_attn.v_proj'.*incomplete"):
        lorakit.check_adapter_files(d, llama)
    with pytest.raises(IncompatibleAdapterError):  # and load_adapter refuses before touching the model
        lorakit.load_adapter(llama, d)
    assert lorakit.list_adapters(llama) == []


def test_check_refuses_tensors_that_fit_nothing(llama, llama_dir, tmp_path):
    d = _saved(llama_dir, tmp_path)
    _rewrite(d, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.whatever", torch.zeros(3)))
    with pytest.raises(IncompatibleAdapterError, match=r"'model.layers.0.mlp.whatever' that matches no LoRA factor"):
        lorakit.check_adapter_files(d, llama)


def test_keys_with_an_adapter_name_inside_load(llama_dir, tmp_path, tokens):
    """Some tools write `lora_A.default.weight`; the same tensors load with equal outputs."""
    d = _saved(llama_dir, tmp_path)
    plain = load(llama_dir)
    lorakit.load_adapter(plain, d)
    _rewrite(d, lambda t: t.update({k.replace(".weight", ".default.weight"): t.pop(k) for k in list(t)}))
    named = load(llama_dir)
    lorakit.load_adapter(named, d)
    with torch.no_grad():
        torch.testing.assert_close(named(tokens).logits, plain(tokens).logits, rtol=0, atol=0)
