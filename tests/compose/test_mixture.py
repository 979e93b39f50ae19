"""Mixture of LoRAs: the forward equals a hand-written reference, only routers train, save/load round-trips."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig, MixtureConfig
from lorakit.errors import AdapterExistsError, ConfigError, IncompatibleAdapterError, MergeStateError
from lorakit.rows import MixedBatchError
from lorakit.state import lora_layers

from ..conftest import load, save_experts

ATOL = 1e-5


@pytest.fixture
def experts(llama_dir, tmp_path):
    return save_experts(llama_dir, tmp_path)


def _random_routers(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            router = layer.adapters["mixture"].router.weight
            router.copy_(torch.randn(router.shape, generator=g))


def _reference(llama_dir, experts, model, tokens, top_k=None):
    """base + Σₑ gₑ(x)·sₑ·Bₑ·Aₑ·x, layer by layer with hooks on a plain copy of the base."""
    ref = load(llama_dir)
    layers = dict(lora_layers(model))

    def hook(name):
        def run(module, inputs, output):
            x = inputs[0]
            layer = layers[name]
            probs = torch.softmax(x @ layer.adapters["mixture"].router.weight.T, -1)
            if top_k is not None:
                top = probs.topk(top_k, -1)
                probs = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
                probs = probs / probs.sum(-1, keepdim=True)
            extra = 0
            for e, expert in enumerate(experts):
                if expert in layer.adapters:
                    a = layer.adapters[expert]
                    extra = extra + probs[..., e:e + 1] * (x @ a.lora_A.T @ a.lora_B.T) * a.scale
            return output + extra
        return run

    for name in layers:
        ref.get_submodule(name).register_forward_hook(hook(name))
    with torch.no_grad():
        return ref(tokens).logits


@pytest.mark.parametrize("top_k", [None, 1])
def test_forward_equals_the_formula(llama_dir, experts, tokens, top_k):
    model = load(llama_dir)
    lorakit.add_mixture(model, MixtureConfig(experts=experts, top_k=top_k))
    _random_routers(model)
    with torch.no_grad():
        got = model(tokens).logits
    torch.testing.assert_close(got, _reference(llama_dir, experts, model, tokens, top_k), atol=ATOL, rtol=0)


def test_untrained_mixture_is_the_average_and_only_routers_train(llama_dir, experts, tokens):
    model = load(llama_dir)
    lorakit.add_mixture(model, MixtureConfig(experts=experts, load_balance=0.05))
    with torch.no_grad():
        mixed = model(tokens).logits
        lorakit.set_active(model, {"code": 0.5, "chat": 0.5})
        torch.testing.assert_close(mixed, model(tokens).logits, atol=ATOL, rtol=0)
        lorakit.set_active(model, "mixture")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("adapters.mixture.router.weight") for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        balance = lorakit.mixture_balance_loss(model)
        assert balance is not None and 0.99 <= balance.item() <= 2.0 + 1e-6  # 1 when uniform, up to E=2
        (loss + 0.05 * balance).backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("router.weight") for k in changed)


def test_balance_loss_is_switch_transformers():
    from lorakit.variants.mixture import _balance_loss

    uniform = torch.full((10, 4), 0.25)
    assert _balance_loss(uniform).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[0.9, 0.1]] * 8)
    assert _balance_loss(collapsed).item() == pytest.approx(2 * (1.0 * 0.9 + 0.0 * 0.1))


def test_save_and_load_give_equal_outputs(llama_dir, experts, tmp_path, tokens):
    model = load(llama_dir)
    lorakit.add_mixture(model, MixtureConfig(experts=experts, top_k=1))
    _random_routers(model, seed=3)
    with torch.no_grad():
        saved = model(tokens).logits
    lorakit.save_mixture(model, tmp_path / "mix")
    assert (tmp_path / "mix" / "experts" / "code" / "adapter_model.safetensors").exists()
    again = load(llama_dir)
    lorakit.load_mixture(again, tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, saved, atol=0, rtol=0)


def test_bad_input(llama_dir, gpt2_dir, experts, tokens):
    with pytest.raises(ConfigError, match="at least two experts"):
        MixtureConfig(experts={"code": experts["code"]})
    for top_k in (3, 0, True, 1.0):
        with pytest.raises(ConfigError, match="top_k"):
            MixtureConfig(experts=experts, top_k=top_k)
    for load_balance in (float("nan"), float("inf"), -0.1, True, "0.01"):
        with pytest.raises(ConfigError, match="load_balance must be a finite number ≥ 0"):
            MixtureConfig(experts=experts, load_balance=load_balance)
    MixtureConfig(experts=experts, load_balance=0)
    gpt2 = load(gpt2_dir)
    with pytest.raises(IncompatibleAdapterError):  # experts made for another base
        lorakit.add_mixture(gpt2, MixtureConfig(experts=experts))
    assert lorakit.list_adapters(gpt2) == []  # nothing half-added
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(target_modules=["q_proj"]), adapter="code")
    with pytest.raises(AdapterExistsError, match="code"):
        lorakit.add_mixture(model, MixtureConfig(experts=experts))
    model = load(llama_dir)
    lorakit.add_mixture(model, MixtureConfig(experts=experts))
    with pytest.raises(MergeStateError, match="per token"):
        lorakit.merge(model)
    with pytest.raises(ConfigError, match="save_mixture"):
        lorakit.save_adapter(model, "/tmp/never", adapter="mixture")
    with pytest.raises(MixedBatchError, match="routes each token"):  # no slots of its own ...
        model.model.layers[0].self_attn.q_proj.adapters["mixture"].row_factors(None)
    with torch.no_grad():  # ... so per-row batches run its rows through its own output (tests/test_rows_mix.py)
        rows = model(tokens[:1].expand(2, -1), adapter_names=["mixture", None]).logits
        mixed = model(tokens[:1]).logits
        with lorakit.disabled(model):
            base = model(tokens[:1]).logits
    torch.testing.assert_close(rows, torch.cat([mixed, base]), atol=ATOL, rtol=0)


def test_lorakit_train_mixture_trains_routers_and_resumes(lm_dir, tmp_path, tokens):
    from safetensors.torch import load_file

    from lorakit.train.cli import config_from_args
    from lorakit.cli import build_parser
    from lorakit.train.loop import train

    from ..train.helpers import letter_rows, write_jsonl

    data = write_jsonl(tmp_path / "letters.jsonl", letter_rows(48))
    common = ["--base", str(lm_dir), "--data", str(data), "--batch-size", "8", "--eval-fraction", "0.2", "--seed", "1"]

    def run(*extra, keep=2):
        args = build_parser().parse_args(["train", *common, *extra])
        config = config_from_args(args)
        config.exact_match, config.keep_checkpoints = False, keep
        return train(config)

    run("--out", str(tmp_path / "x1"), "--targets", "q_proj", "v_proj", "--max-steps", "2", "--lr", "1e-2")
    run("--out", str(tmp_path / "x2"), "--targets", "v_proj", "up_proj", "--max-steps", "2", "--lr", "1e-2")
    mix = ["--mixture", f"one={tmp_path / 'x1'}", f"two={tmp_path / 'x2'}", "--lr", "5e-2", "--load-balance", "0.1"]
    straight = run(*mix, "--out", str(tmp_path / "m"), "--max-steps", "4", "--save-every", "2", keep=3)
    assert straight.model is not None
    routers = load_file(tmp_path / "m" / "router.safetensors")
    assert routers and all(k.endswith(".router.weight") for k in routers)
    assert any(v.abs().sum() > 0 for v in routers.values())  # they trained (they start at zero)
    assert lorakit.trainable_parameters(straight.model, verbose=False).trainable == sum(v.numel() for v in routers.values())
    # a killed run resumes from its checkpoint to the same routers
    import shutil

    shutil.copytree(tmp_path / "m" / "checkpoints" / "step-000002", tmp_path / "r" / "checkpoints" / "step-000002")
    run(*mix, "--out", str(tmp_path / "r"), "--max-steps", "4", "--save-every", "2", "--resume")
    again = load_file(tmp_path / "r" / "router.safetensors")
    assert all(torch.equal(again[k], routers[k]) for k in routers)
    # a run that ends between checkpoints still ends with one, written in the mixture's own form
    run(*mix, "--out", str(tmp_path / "odd"), "--max-steps", "3", "--save-every", "2", keep=3)
    assert (tmp_path / "odd" / "checkpoints" / "step-000003" / "router.safetensors").exists()
    # the saved mixture loads back with equal outputs
    model = load(lm_dir)
    lorakit.load_mixture(model, tmp_path / "m")
    straight.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens % 100).logits, straight.model(tokens % 100).logits, atol=0, rtol=0)
