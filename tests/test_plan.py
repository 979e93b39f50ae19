"""The memory planner: the seeds' parameter arithmetic on meta-device models, activation bytes against the tensors
autograd really saves, NF4 and 8-bit optimizer bytes against bitsandbytes' own, and bad config files."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.cli import main
from lorakit.errors import ModelConfigError
from lorakit.plan.arithmetic import layer_params, settings_giving
from lorakit.plan.storage import nf4_bytes, optimizer_bytes

from .conftest import llama_config

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama2_7b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)


def test_llama2_7b_r8_qv_is_the_seeds_figure(llama2_7b):
    plan = lorakit.plan_memory(llama2_7b, method="lora", rank=8, targets=["q_proj", "v_proj"], serve_adapters=0)
    assert plan.base.total == 6_738_415_616
    assert plan.adapter.trainable == 4_194_304 == 32 * 2 * 8 * (4096 + 4096)
    assert f"{plan.adapter.percent:.3f}" == "0.062" and f"{100 * 4_194_304 / plan.base.total:.3f}" == "0.062"
    assert len(plan.adapter.modules) == 64


def test_4096_square_layer_table():
    for r, params, pct in [(4, 32_768, 0.1953125), (8, 65_536, 0.390625), (16, 131_072, 0.78125),
                           (32, 262_144, 1.5625), (64, 524_288, 3.125)]:
        assert layer_params(4096, 4096, r) == (params, pct)


def test_seven_modules_at_r16_are_not_33554432(llama2_7b):
    plan = lorakit.plan_memory(llama2_7b, method="lora", rank=16, targets=SEVEN, serve_adapters=0)
    per_block = 4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008)
    assert plan.adapter.trainable == 32 * per_block == 39_976_960
    found = settings_giving(llama2_7b, 33_554_432)
    assert (32, ("q_proj", "k_proj", "v_proj", "o_proj")) in found and (64, ("q_proj", "v_proj")) in found
    assert all(len(leaves) < 7 for _, leaves in found)  # no rank on all seven gives the quoted figure
    assert (8, ("q_proj", "v_proj")) in settings_giving(llama2_7b, 4_194_304)


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd saves for backward (parameters and buffers excluded)."""
    held = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("method,lora,dtype,ckpt", [
    ("full", None, torch.float32, False),
    ("full", None, torch.bfloat16, False),
    ("full", None, torch.float32, True),
    ("lora", LoraConfig(r=8, target_modules="all-linear"), torch.float32, False),
    ("lora", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]), torch.float32, False),
    ("lora", LoraConfig(r=4, target_modules=["o_proj", "down_proj"]), torch.float32, False),
    ("lora", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), torch.bfloat16, False),  # fp32 adapters on bf16
    ("lora", LoraConfig(r=8, target_modules="all-linear"), torch.float32, True),
])
def test_activation_bytes_equal_what_autograd_saves(method, lora, dtype, ckpt):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).to(dtype).train()
    if lora is not None:
        lorakit.inject(model, lora)
    if ckpt:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    measured = _saved_bytes(model, torch.randint(0, 128, (2, 24)))
    plan = lorakit.plan_memory(llama_config(), method=method, lora_config=lora, batch=2, seq=24, dtype=dtype,
                               gradient_checkpointing=ckpt, serve_adapters=0)
    assert plan.methods[method].activations == measured


def test_qlora_activations_equal_peft_qlora(llama_dir):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=quant, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).train()
    measured = _saved_bytes(model, torch.randint(0, 128, (2, 24)))
    plan = lorakit.plan_memory(llama_dir, method="qlora", rank=8, targets=["q_proj", "v_proj"], batch=2, seq=24,
                               dtype="fp32", serve_adapters=0)
    assert plan.methods["qlora"].activations == measured
    stored = sum(m.weight.data.numel() + m.weight.quant_state.absmax.numel() + 4 * m.weight.quant_state.code.numel()
                 + 4 * m.weight.quant_state.state2.absmax.numel() + 4 * m.weight.quant_state.state2.code.numel() + 4
                 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert plan.methods["qlora"].weights == stored + (plan.base.total - plan.base.linear) * 4


def test_nf4_bytes_match_bitsandbytes_both_layouts():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(256, 192, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    qs = layer.weight.quant_state
    held = [layer.weight.data, qs.absmax, qs.code, qs.state2.absmax, qs.state2.code, qs.offset]
    assert sum(t.numel() * t.element_size() for t in held) == nf4_bytes(192, 256) == 26_448
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the standard layout")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 256))
    qs = layer.weight.quant_state
    assert qs.packing_format_for_cpu and not qs.nested
    held = [layer.weight.data, qs.absmax, qs.code]
    assert sum(t.numel() * t.element_size() for t in held) == nf4_bytes(192, 256, cpu_packed=True) == 26_176


def test_adamw8bit_bytes_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(8, 4096)), torch.nn.Parameter(torch.randn(100, 8))]
    opt = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    held = sum(v.numel() * v.element_size() for p in params for k, v in opt.state[p].items()
               if isinstance(v, torch.Tensor) and not k.startswith("qmap"))  # code books are shared
    assert held == optimizer_bytes([8 * 4096, 800], 4, "adamw8bit") == 2 * (32_768 + 4 * 128) + 8 * 800
    assert optimizer_bytes([10], 4, "adamw") == 80


def test_plan_parts_add_up_by_hand():
    # llama_config(): vocab 128, hidden 64, intermediate 128, 2 blocks, 4 heads of 16, 2 key/value heads, untied head.
    block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    total = 128 * 64 * 2 + 2 * block + 64
    plan = lorakit.plan_memory(llama_config(), rank=4, targets=["q_proj", "v_proj"], batch=2, seq=24, dtype="fp32",
                               serve_adapters=3)
    assert plan.base.total == total == 90_432
    full, lora, qlora = plan.methods["full"], plan.methods["lora"], plan.methods["qlora"]
    assert (full.weights, full.gradients, full.optimizer) == (4 * total, 4 * total, 8 * total)
    adapter = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert lora.trainable == qlora.trainable == adapter == 1_792
    assert (lora.adapter, lora.gradients, lora.optimizer) == (4 * adapter, 4 * adapter, 8 * adapter)
    linear = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    assert qlora.weights == sum(nf4_bytes(o, i) for o, i in linear) + 4 * (total - sum(o * i for o, i in linear))
    for m in plan.methods.values():
        held = m.activations if m.peak_at == "backward" else m.gradients
        assert m.peak == m.weights + m.adapter + m.optimizer + held + m.temporaries and m.temporaries >= 0
    s = plan.serving
    assert (s.shared, s.merged) == (4 * total + 3 * 4 * adapter, 3 * 4 * total)


def test_plan_reads_only_the_config(llama_dir, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text((llama_dir / "config.json").read_text())
    (d / "model.safetensors").write_bytes(b"not a safetensors file")  # reading it would fail
    plan = lorakit.plan_memory(d, targets=["q_proj"], serve_adapters=0)
    assert plan.base.total == 90_432


@pytest.mark.parametrize("content,expected", [
    ({"hidden_size": 64}, "missing key 'model_type'"),
    ({"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}, "missing key 'hidden_size'"),
    ({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "vocab_size": 128}, "missing key 'num_hidden_layers' or 'n_layer'"),
    ({"model_type": "no-such-model", "hidden_size": 1}, "'no-such-model' is not known"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_config_names_the_file_and_the_key(tmp_path, content, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ModelConfigError, match=expected) as e:
        lorakit.plan_memory(path)
    assert str(path) in str(e.value)


def test_bad_paths(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="x.json is not a transformers config: it is not valid JSON"):
        lorakit.plan_memory(tmp_path / "x.json")
    with pytest.raises(ModelConfigError, match="does not exist"):
        lorakit.plan_memory(tmp_path / "missing")


def test_cli_prints_the_table_and_errors_cleanly(llama_dir, tmp_path, capsys):
    assert main(["plan", "--model", str(llama_dir), "--targets", "q_proj", "v_proj", "--batch", "2", "--seq", "24",
                 "--serve-adapters", "4"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 3,584 ||" in out  # r=8 (the default) on q (64->64) and v (64->32) in 2 blocks
    assert "full FT" in out and "LoRA" in out and "QLoRA" in out and "4 merged" in out and "optimizer states" in out
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "missing key 'model_type'" in capsys.readouterr().err


def test_replan_equals_a_fresh_plan_without_building_the_model_again(llama_dir):
    from lorakit.plan import replan

    first = lorakit.plan_memory(llama_dir, rank=4, targets="all-linear", batch=2, seq=32, serve_adapters=0)
    for change in ({"batch": 5}, {"seq": 48, "gradient_checkpointing": True}, {"optim": "adamw8bit"}):
        fresh = lorakit.plan_memory(llama_dir, rank=4, targets="all-linear", serve_adapters=0,
                                    **{"batch": 2, "seq": 32, **change})
        again = replan(first, **change)
        assert again.methods == fresh.methods and again.notes == fresh.notes
        assert (again.batch, again.seq, again.optim) == (fresh.batch, fresh.seq, fresh.optim)
    assert first.batch == 2 and first.methods == lorakit.plan_memory(llama_dir, rank=4, targets="all-linear", batch=2,
                                                                     seq=32, serve_adapters=0).methods  # unchanged


def test_builtin_names_the_built_in_model_as_in_recommend_and_train(builtin_cache, lm_dir, cli):
    """`--model builtin` reads the built-in model's config from its cache directory (converted there once, here a
    stand-in already in place), as `lorakit recommend --model builtin` and `train --base builtin` do."""
    builtin, direct = (lorakit.plan_memory(m, serve_adapters=0) for m in ("builtin", lm_dir))
    assert builtin.base == direct.base and builtin.adapter == direct.adapter and builtin.methods == direct.methods
    code, out, err = cli("plan", "--model", "builtin", "--targets", "q_proj", "v_proj")
    assert code == 0 and "trainable params:" in out and err == ""
    _, expected, _ = cli("plan", "--model", lm_dir, "--targets", "q_proj", "v_proj")
    assert out == expected
    code, out, _ = cli("plan", "--help")
    assert code == 0 and "builtin" in out
