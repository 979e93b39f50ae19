"""`lorakit check`: which engines can serve an adapter and why not; --fix writes a copy that computes the same
(rank padding checked against lorakit and PEFT); the conversion registry; a registry root with broken entries."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraConfig
from lorakit.check import CONVERSIONS, Conversion, check, fix, read, register_conversion
from lorakit.cli import main
from lorakit.errors import ConfigError

from .conftest import load, randomise_lora


def saved(llama_dir, path, config):
    model = load(llama_dir)
    lorakit.inject(model, config)
    randomise_lora(model, std=0.2, seed=1)
    lorakit.save_adapter(model, path)
    return path


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return path


def test_a_plain_adapter_is_servable_everywhere(llama_dir, tmp_path, capsys):
    path = saved(llama_dir, tmp_path / "a", LoraConfig(r=12, target_modules="all-linear"))
    for engine in ("vllm", "lorax", "peft", "lorakit"):
        assert check(path, engine)[1] == []
        assert main(["check", str(path), "--for", engine]) == 0
    assert "--max-lora-rank 16" in capsys.readouterr().out  # the smallest of vLLM's choices that fits r=12


def test_rank_padding_makes_per_layer_ranks_and_scales_servable(llama_dir, tmp_path, capsys):
    from peft import PeftModel

    path = saved(llama_dir, tmp_path / "a", LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                                      rank_pattern={"v_proj": 4}, alpha_pattern={"up_proj": 3}))
    _, found = check(path, "vllm")
    assert [p.fix for p in found] == ["rank-padding"] and "one scale" in found[0].what
    assert main(["check", str(path), "--for", "vllm", "--fix", "--out", str(tmp_path / "fixed")]) == 0
    assert "rank-padding" in capsys.readouterr().out
    fixed = read(tmp_path / "fixed")
    assert check(tmp_path / "fixed", "vllm")[1] == [] and set(fixed.ranks.values()) == {8}
    assert (fixed.config["r"], fixed.config["lora_alpha"], fixed.config["rank_pattern"]) == (8, 8, {})
    x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lorakit.load_adapter(load(llama_dir), path)(x).logits
        after = lorakit.load_adapter(load(llama_dir), tmp_path / "fixed")(x).logits
        peft_after = PeftModel.from_pretrained(load(llama_dir), tmp_path / "fixed").eval()(x).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(peft_after, before, atol=1e-5, rtol=0)  # one global scale, as vLLM reads it


@pytest.mark.parametrize("change,reason", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "biases"),
    ({"modules_to_save": ["score", "lm_head"]}, "['score']"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
])
def test_what_no_conversion_can_fix_is_said(llama_dir, tmp_path, capsys, change, reason):
    path = edit_config(saved(llama_dir, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"])), **change)
    for engine in ("vllm", "lorax"):
        adapter, found = check(path, engine)
        assert any(reason in p.what and p.fix is None for p in found)
        with pytest.raises(ConfigError, match="no servable copy"):
            fix(adapter, found, engine, tmp_path / "out")
    assert main(["check", str(path), "--for", "vllm"]) == 1
    assert "[no conversion exists]" in capsys.readouterr().out
    assert main(["check", str(path), "--for", "vllm", "--fix", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_rank_above_vllms_largest_choice(llama_dir, tmp_path):
    path = saved(llama_dir, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    tensors = {k: (torch.zeros(600, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 600))
               for k, v in load_file(path / "adapter_model.safetensors").items()}
    save_file(tensors, path / "adapter_model.safetensors")
    assert any("above vLLM's largest" in p.what for p in check(edit_config(path, r=600), "vllm")[1])
    assert check(path, "lorax")[1] == []


def test_conversions_plug_into_the_registry(llama_dir, tmp_path, monkeypatch):
    """A problem names its conversion; without it in the registry --fix says so, with it --fix runs it and then pads
    the ranks it leaves. (The real adalora-to-lora is tested in test_check_fix.py; a stand-in here.)"""
    path = edit_config(saved(llama_dir, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
                       peft_type="ADALORA")
    adapter, found = check(path, "vllm")
    assert [p.fix for p in found] == ["adalora-to-lora"]
    monkeypatch.delitem(CONVERSIONS, "adalora-to-lora")
    with pytest.raises(ConfigError, match="adalora-to-lora conversion is not available"):
        fix(adapter, found, "vllm", tmp_path / "out")

    def fake_adalora_to_lora(adapter, out, engine):  # LoRA + a rank_pattern, as the real one leaves
        shutil.copytree(adapter.path, out, dirs_exist_ok=True)
        edit_config(out, peft_type="LORA", rank_pattern={"v_proj": 2})
        tensors = load_file(out / "adapter_model.safetensors")
        for k in list(tensors):
            if "v_proj" in k:
                tensors[k] = (tensors[k][:2] if "lora_A" in k else tensors[k][:, :2]).contiguous()
        save_file(tensors, out / "adapter_model.safetensors")

    register_conversion(Conversion("adalora-to-lora", "test stand-in", fake_adalora_to_lora))  # undone by monkeypatch
    assert fix(adapter, found, "vllm", tmp_path / "out") == ["adalora-to-lora", "rank-padding"]
    assert check(tmp_path / "out", "vllm")[1] == []


@pytest.mark.filterwarnings("ignore:adapter_config.json has a key")
def test_foreign_key_spellings_are_rewritten_for_peft(llama_dir, tmp_path):
    from peft import PeftModel

    path = saved(llama_dir, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    tensors = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
               for k, v in load_file(path / "adapter_model.safetensors").items()}
    save_file(tensors, path / "adapter_model.safetensors")
    edit_config(path, a_key_from_elsewhere=1)
    adapter, found = check(path, "peft")
    assert {p.fix for p in found} == {"canonical-files"} and len(found) == 2
    fix(adapter, found, "peft", tmp_path / "out")
    assert check(tmp_path / "out", "peft")[1] == []
    x = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ours = lorakit.load_adapter(load(llama_dir), path)(x).logits
        theirs = PeftModel.from_pretrained(load(llama_dir), tmp_path / "out").eval()(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_a_registry_root_lists_its_broken_entries(llama_dir, tmp_path, capsys):
    root = tmp_path / "root"
    for name in ("team/a", "team/b", "c"):
        saved(llama_dir, root / name, LoraConfig(r=2, target_modules=["q_proj"]))
    (root / "junk").mkdir()
    (root / "junk" / "adapter_config.json").write_text("{not json")
    saved(llama_dir, root / "no-weights", LoraConfig(r=2, target_modules=["q_proj"]))
    (root / "no-weights" / "adapter_model.safetensors").unlink()
    assert main(["check", str(root), "--for", "lorakit"]) == 1
    out = capsys.readouterr().out
    assert "3 of 5 adapters can be served by lorakit" in out
    assert "junk" in out and "not valid JSON" in out and "adapter_model.safetensors is missing" in out


def _residual_pissa(llama_dir, path):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"))
    return lorakit.save_adapter(model, path, residual_form=True)


@pytest.mark.parametrize("kind,reason,fixed_by", [
    ("bias", "biases (bias='lora_only')", None),
    ("modules_to_save", "full copies of ['down_proj']", None),
    ("pissa", "saved for a residual base", "pissa-to-lora"),
    ("plain", None, None),
])
def test_lorakit_says_ok_exactly_when_the_server_serves(llama_dir, tmp_path, kind, reason, fixed_by):
    """`check --for lorakit` and the server's store judge by one rule (lorakit.servable), with the same words."""
    from lorakit.serve import AdapterStore

    path = tmp_path / kind
    if kind == "pissa":
        _residual_pissa(llama_dir, path)
    else:
        config = {"bias": LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"),
                  "modules_to_save": LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["down_proj"]),
                  "plain": LoraConfig(r=2, target_modules=["q_proj"])}[kind]
        saved(llama_dir, path, config)
    _, found = check(path, "lorakit")
    store = AdapterStore(load(llama_dir))
    if reason is None:
        assert found == [] and store.register("a", path)
        return
    assert len(found) == 1 and reason in found[0].what and found[0].fix == fixed_by
    with pytest.raises(lorakit.errors.IncompatibleAdapterError) as refused:
        store.register("a", path)
    assert str(refused.value) == found[0].what
    assert main(["check", str(path), "--for", "lorakit"]) == 1


def test_lorakit_checks_the_layers_against_the_base(llama_dir, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = saved(llama_dir, tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wide = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(wide)
    assert main(["check", str(path), "--for", "lorakit", "--base", str(llama_dir)]) == 0
    assert "note" not in capsys.readouterr().out
    assert main(["check", str(path), "--for", "lorakit", "--base", str(wide)]) == 1
    out = capsys.readouterr().out
    assert "no:" in out and "model.layers.0.self_attn.q_proj" in out and "64" in out and "96" in out
    # by default, the base its config names when that is a local directory (here: the tiny Llama) ...
    assert check(path, "lorakit")[1] == []
    # ... and without one, the layers are not judged, which the report says
    edit_config(path, base_model_name_or_path="someone/llama-7b")
    assert main(["check", str(path), "--for", "lorakit"]) == 0
    assert "not checked against a base model's (pass --base DIR" in capsys.readouterr().out


def test_a_registry_root_lists_directories_without_a_config(llama_dir, tmp_path, capsys):
    root = tmp_path / "root"
    saved(llama_dir, root / "ok", LoraConfig(r=2, target_modules=["q_proj"]))
    saved(llama_dir, root / "half", LoraConfig(r=2, target_modules=["q_proj"]))
    (root / "half" / "adapter_config.json").unlink()  # only adapter_model.safetensors left
    (root / "weights").mkdir()
    shutil.copy(root / "ok" / "adapter_model.safetensors", root / "weights" / "model.safetensors")
    (root / "logs").mkdir()
    (root / "logs" / "train.txt").write_text("no weights here: not an entry")
    assert main(["check", str(root), "--for", "lorakit"]) == 1
    out = capsys.readouterr().out
    assert "1 of 3 adapters can be served by lorakit" in out
    for name in ("half", "weights"):
        assert f"{root / name}/adapter_config.json is missing" in out
    assert "logs" not in out


def test_vllm_modules_are_judged_for_the_bases_architecture(llama_dir, gpt2_dir, tmp_path, capsys):
    gpt2 = load(gpt2_dir)
    lorakit.inject(gpt2, LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    gpt2_adapter = lorakit.save_adapter(gpt2, tmp_path / "gpt2")
    _, found = check(gpt2_adapter, "vllm")  # its config names gpt2_dir, a local gpt2 model
    assert len(found) == 1 and "vLLM's gpt2 model takes no LoRA adapters" in found[0].what and found[0].fix is None
    assert check(gpt2_adapter, "lorax")[1] == []  # LoRAX keeps its own (all-architecture) list
    llama = saved(llama_dir, tmp_path / "llama", LoraConfig(r=4, target_modules="all-linear"))
    assert check(llama, "vllm")[1] == [] and read(llama).leaves() == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"}
    # a Llama adapter on GPT-2's module names (as if trained on another model): named against vLLM's Llama list
    tensors = {k.replace("self_attn.q_proj", "self_attn.c_attn"): v
               for k, v in load_file(llama / "adapter_model.safetensors").items()}
    save_file(tensors, llama / "adapter_model.safetensors")
    found = check(llama, "vllm")[1]
    assert any("['c_attn'], which vLLM does not put LoRA on in llama models" in p.what for p in found)
    # --base names the architecture for an adapter whose config names none that is local
    edit_config(gpt2_adapter, base_model_name_or_path="openai-community/gpt2")
    assert main(["check", str(gpt2_adapter), "--for", "vllm"]) == 0
    assert "not checked against vLLM's LoRA modules for this architecture (base unknown" in capsys.readouterr().out
    assert main(["check", str(gpt2_adapter), "--for", "vllm", "--base", str(gpt2_dir)]) == 1
    assert "takes no LoRA adapters" in capsys.readouterr().out


def test_a_saved_mixture_is_servable_by_lorakit_only(llama_dir, tmp_path, capsys):
    """One entry (its experts checked with it, not listed apart): lorakit serves it, the others have no learned router."""
    experts = {name: str(saved(llama_dir, tmp_path / "src" / name, LoraConfig(r=4, target_modules=targets)))
               for name, targets in (("code", ["q_proj"]), ("chat", ["v_proj"]))}
    model = lorakit.add_mixture(load(llama_dir), lorakit.MixtureConfig(experts=experts))
    mix = lorakit.save_mixture(model, tmp_path / "root" / "mix")
    saved(llama_dir, tmp_path / "root" / "plain", LoraConfig(r=4, target_modules=["q_proj"]))
    assert check(mix, "lorakit")[1] == []
    assert main(["check", str(mix), "--for", "lorakit"]) == 0
    assert f"ok: {mix} can be served by lorakit" in capsys.readouterr().out
    for engine in ("vllm", "lorax", "peft"):
        _, found = check(mix, engine)
        assert len(found) == 1 and "learned router" in found[0].what and found[0].fix is None
        assert main(["check", str(mix), "--for", engine]) == 1
    capsys.readouterr()
    assert main(["check", str(tmp_path / "root"), "--for", "lorakit"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 adapters" in out and "/experts/" not in out  # the mixture and the plain adapter
    with pytest.raises(ConfigError, match="learned router"):
        fix(read(mix), check(mix, "vllm")[1], "vllm", tmp_path / "fixed")
    shutil.rmtree(mix / "experts" / "chat")
    _, found = check(mix, "lorakit")
    assert len(found) == 1 and "expert 'chat'" in found[0].what and "experts/chat" in found[0].what
