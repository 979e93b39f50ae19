"""`lorakit check --fix` with the conversions convert.py registers: AdaLoRA → LoRA and PiSSA/OLoRA → plain LoRA.
Each fixed copy passes the check, and PEFT runs it with the original adapter's logits (PiSSA: the original on its
residual base, the copy on the untouched one); what cannot be converted is refused and nothing is written."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import AdaLoraConfig, LoraConfig
from lorakit.check import CONVERSIONS, check, fix, read
from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.state import adapter_layers

from .conftest import load, perturb, randomise_lora

TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 1e-5


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def peft_logits(base_dir, adapter_dir, tokens):
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load(base_dir), adapter_dir).eval(), tokens)


def test_the_cli_and_the_library_both_see_the_conversions():
    assert {"adalora-to-lora", "pissa-to-lora", "rank-padding", "canonical-files"} <= set(CONVERSIONS)
    # A fresh interpreter that imports only lorakit.check sees them too (lorakit's __init__ imports convert.py).
    out = subprocess.run([sys.executable, "-c", "from lorakit.check import CONVERSIONS; print(sorted(CONVERSIONS))"],
                         capture_output=True, text=True, check=True).stdout
    assert "adalora-to-lora" in out and "pissa-to-lora" in out


def test_adalora_is_converted_and_padded_for_vllm(llama_dir, tmp_path, tokens, capsys):
    torch.manual_seed(0)
    model = load(llama_dir)
    lorakit.inject(model, AdaLoraConfig(init_r=6, target_r=2, target_modules=TARGETS, total_step=10, tinit=2,
                                        tfinal=0, alpha=8))
    randomise_lora(model, std=0.2, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 11):  # a short run: the allocator moves the rank budget between layers
        (model(input_ids=tokens, labels=tokens).loss + lorakit.adalora_orth_loss(model)).backward()
        opt.step()
        lorakit.adalora_step(model, step)
        opt.zero_grad(set_to_none=True)
    model.eval()
    expected = logits(model, tokens)
    lorakit.save_adapter(model, tmp_path / "ada")
    kept = {a.rank for _, _, a in adapter_layers(model, "default")} - {0}
    assert len(kept) > 1  # the layers' ranks differ, so vLLM also needs one rank for all

    assert [p.fix for p in check(tmp_path / "ada", "vllm")[1]] == ["adalora-to-lora"]
    assert main(["check", str(tmp_path / "ada"), "--for", "vllm"]) == 1
    assert "[fix: --fix applies adalora-to-lora]" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "ada"), "--for", "vllm", "--fix", "--out", str(tmp_path / "fixed")]) == 0
    assert "(adalora-to-lora, rank-padding)" in capsys.readouterr().out  # AdaLoRA's LoRA form keeps per-layer ranks
    assert check(tmp_path / "fixed", "vllm")[1] == []
    fixed = read(tmp_path / "fixed")
    assert fixed.peft_type == "LORA" and set(fixed.ranks.values()) == {max(kept)} and fixed.config["rank_pattern"] == {}
    torch.testing.assert_close(peft_logits(llama_dir, tmp_path / "fixed", tokens), expected, atol=ATOL, rtol=0)
    again = lorakit.load_adapter(load(llama_dir), tmp_path / "ada")  # lorakit's reading of the original file
    torch.testing.assert_close(logits(again, tokens), expected, atol=ATOL, rtol=0)
    # For PEFT nothing needs converting; LoRAX takes the same conversion.
    assert check(tmp_path / "ada", "peft")[1] == []
    adapter, found = check(tmp_path / "ada", "lorax")
    assert fix(adapter, found, "lorax", tmp_path / "lorax") == ["adalora-to-lora", "rank-padding"]


def ours_residual(llama_dir, init, **kw):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS, init=init, **kw))
    perturb(model)
    return model


def peft_residual(llama_dir, init):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = get_peft_model(load(llama_dir), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                           init_lora_weights=init))
    perturb(model)
    return model.eval()


@pytest.mark.parametrize("who,init,kw,applied", [
    ("lorakit", "pissa", {}, "pissa-to-lora"),
    ("lorakit", "pissa", {"rslora": True}, "pissa-to-lora"),  # α·√2 keeps α/√r at rank 2r
    ("lorakit", "olora", {"rank_pattern": {"v_proj": 2}}, "pissa-to-lora, rank-padding"),
    ("peft", "pissa", {}, "pissa-to-lora"),
])
def test_pissa_saved_for_its_residual_base_becomes_plain_lora(llama_dir, tmp_path, tokens, capsys, who, init, kw,
                                                              applied):
    if who == "lorakit":
        model = ours_residual(llama_dir, init, **kw)
        lorakit.save_adapter(model, tmp_path / "p", residual_form=True)  # as lorakit's checkpoints save it
    else:
        model = peft_residual(llama_dir, init)
        model.save_pretrained(tmp_path / "p")  # PEFT's own PiSSA file: A and B as trained
    expected = logits(model, tokens)  # the original adapter on its residual base
    assert not torch.allclose(expected, logits(load(llama_dir), tokens), atol=1e-3)  # it changes the output
    path, out = tmp_path / "p", tmp_path / "fixed"
    assert json.loads((path / "adapter_config.json").read_text())["init_lora_weights"] == init

    found = check(path, "vllm")[1]
    assert found[0].fix == "pissa-to-lora" and "changed base" in found[0].what
    assert main(["check", str(path), "--for", "vllm"]) == 1
    assert "[fix: --fix with --base DIR applies pissa-to-lora]" in capsys.readouterr().out
    assert main(["check", str(path), "--for", "vllm", "--fix", "--out", str(out)]) == 2  # no base: nothing written
    assert "pass --base DIR" in capsys.readouterr().err and not out.exists()

    assert main(["check", str(path), "--for", "vllm", "--fix", "--out", str(out), "--base", str(llama_dir)]) == 0
    assert f"({applied})" in capsys.readouterr().out
    assert check(out, "vllm")[1] == []
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["peft_type"] == "LORA"
    assert set(read(out).ranks.values()) == {8}  # rank 2r: [A ; A0], [B | −B0]
    torch.testing.assert_close(peft_logits(llama_dir, out, tokens), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(lorakit.load_adapter(load(llama_dir), out), tokens), expected, atol=ATOL, rtol=0)


def test_convert_writes_the_same_plain_lora(llama_dir, tmp_path, tokens, capsys):
    model = ours_residual(llama_dir, "pissa")
    lorakit.save_adapter(model, tmp_path / "p", residual_form=True)
    lorakit.save_adapter(model, tmp_path / "direct")  # save_adapter's own plain form, from the trained model
    assert main(["convert", str(tmp_path / "p"), "--to", "lora", "--out", str(tmp_path / "c")]) == 2
    assert "pass --base DIR" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "p"), "--to", "lora", "--out", str(tmp_path / "c"),
                 "--base", str(llama_dir)]) == 0
    direct, converted = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("direct", "c"))
    assert direct.keys() == converted.keys()
    for k in direct:
        torch.testing.assert_close(converted[k], direct[k], atol=1e-6, rtol=1e-5)
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "direct" / "adapter_config.json").read_text())
    with pytest.raises(AdapterFileError, match="not a PiSSA/OLoRA adapter"):
        lorakit.pissa_to_lora(tmp_path / "direct", llama_dir, tmp_path / "x")


def test_where_no_conversion_exists_nothing_is_written(llama_dir, tmp_path, capsys):
    dora = load(llama_dir)
    lorakit.inject(dora, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    randomise_lora(dora)
    lorakit.save_adapter(dora, tmp_path / "dora")
    torch.manual_seed(0)
    niter = ours_residual(llama_dir, "pissa_niter_2")
    lorakit.save_adapter(niter, tmp_path / "niter", residual_form=True)
    for name, reason in (("dora", "DoRA"), ("niter", "randomised SVD")):
        path, out = tmp_path / name, tmp_path / f"{name}-out"
        adapter, found = check(path, "vllm")
        assert [p.fix for p in found if reason in p.what] == [None]
        with pytest.raises(ConfigError, match=f"no servable copy.*{reason}"):
            fix(adapter, found, "vllm", out, base=llama_dir)
        assert main(["check", str(path), "--for", "vllm", "--fix", "--out", str(out), "--base", str(llama_dir)]) == 2
        assert reason in capsys.readouterr().err and not out.exists()
    assert check(tmp_path / "dora", "peft")[1] == []  # PEFT's own spelling of DoRA's magnitude (no ".weight")
    with pytest.raises(AdapterFileError, match="randomised SVD"):
        lorakit.pissa_to_lora(tmp_path / "niter", llama_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_fix_with_nothing_to_fix_copies_the_adapter(llama_dir, tmp_path, tokens, cli):
    """Scripted pipelines run `check --fix --out DIR` on every adapter and serve DIR: it is there either way."""
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, target_modules=TARGETS))
    perturb(model)
    path = lorakit.save_adapter(model, tmp_path / "plain")
    code, out, _ = cli("check", path, "--for", "vllm", "--fix", "--out", tmp_path / "copy")
    assert code == 0 and f"nothing to fix; copied to {tmp_path / 'copy'}" in out
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "copy" / name).read_bytes() == (path / name).read_bytes()
    assert check(tmp_path / "copy", "vllm")[1] == []
    torch.testing.assert_close(peft_logits(llama_dir, tmp_path / "copy", tokens), logits(model, tokens), atol=ATOL, rtol=0)
