"""Per-row slots (lorakit.rows): loading copies one adapter into a free slot of its rank, deleting frees it, a reused
slot computes what a fresh load computes, ranks mix in one batch, loaded adapters are held once, and a per-feature
factor G (DoRA-like adapters) rides in the slot."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.io import attach_adapter, read_adapter_tensors
from lorakit.layers import LoraAdapter
from lorakit.state import lora_layers

from .conftest import VOCAB, load, randomise_lora

ATOL = 1e-5
X = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(5))


def saved(llama_dir, path, rank, seed, targets=("q_proj", "v_proj", "down_proj")):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=list(targets)))
    randomise_lora(model, std=0.2, seed=seed)
    return lorakit.save_adapter(model, path)


def alone(llama_dir, path, x):
    model = lorakit.load_adapter(load(llama_dir), path)
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("length", [9, 1], ids=["batched-products", "few-tokens"])
def test_a_reused_slot_equals_a_fresh_load(llama_dir, tmp_path, length):
    """Also with decode-sized rows, whose side-by-side copy of a and b (kept on the layer) must not outlive a's slot."""
    x = X[:, :length]
    paths = {n: saved(llama_dir, tmp_path / n, 4, seed) for seed, n in enumerate(["a", "b", "c"])}
    model = load(llama_dir)
    lorakit.load_adapter(model, paths["a"], adapter="a")
    lorakit.load_adapter(model, paths["b"], adapter="b")
    with torch.no_grad():
        model(x, adapter_names=["a", "b", None])
    q = model.model.layers[0].self_attn.q_proj
    slot_a = q.row_slots.slots["a"].index
    lorakit.delete_adapter(model, "a")
    lorakit.load_adapter(model, paths["c"], adapter="c")
    assert q.row_slots.slots["c"].index == slot_a and len(q.row_slots.groups) == 1  # the freed slot, nothing re-stacked
    with torch.no_grad():
        got = model(x, adapter_names=["c", "b", None]).logits
        base = load(llama_dir)(x).logits
    torch.testing.assert_close(got[0], alone(llama_dir, paths["c"], x)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], alone(llama_dir, paths["b"], x)[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[2], base[2], atol=ATOL, rtol=0)


def test_mixed_ranks_in_one_batch_and_growth(llama_dir, tmp_path):
    """Ranks 2, 4 and 8 sit in their own buffers (a rank-2 adapter pays for rank 2); with 6 adapters of rank 4 the
    buffers grow past their first capacity, and every row still computes what its adapter computes alone."""
    specs = {"r2": 2, "r8": 8, **{f"r4_{i}": 4 for i in range(6)}}
    paths = {n: saved(llama_dir, tmp_path / n, r, seed) for seed, (n, r) in enumerate(specs.items())}
    model = load(llama_dir)
    for name, path in paths.items():
        lorakit.load_adapter(model, path, adapter=name)
    q = model.model.layers[1].self_attn.q_proj
    assert sorted(g.key[0] for g in q.row_slots.groups.values()) == [2, 4, 8]
    assert {g.key[0]: g.A.shape[-1] for g in q.row_slots.groups.values()} == {2: 2, 4: 4, 8: 8}
    names = ["r2", "r4_5", "r8", None, "r4_0", "r8"]
    x = torch.randint(0, VOCAB, (len(names), 9), generator=torch.Generator().manual_seed(6))
    for length in (9, 2):  # batched products, and the few-tokens path
        with torch.no_grad():
            got = model(x[:, :length], adapter_names=names).logits
        for i, name in enumerate(names):
            expected = alone(llama_dir, paths[name], x[i:i + 1, :length]) if name else load(llama_dir)(x[i:i + 1, :length]).logits
            torch.testing.assert_close(got[i], expected[0], atol=ATOL, rtol=0)


def test_loaded_adapters_are_held_once_and_a_fixed_capacity_never_moves(llama_dir, tmp_path):
    path = saved(llama_dir, tmp_path / "a", 4, 0)
    model = load(llama_dir)
    for i in range(3):
        files = lorakit.check_adapter_files(path, model)
        attach_adapter(model, files, read_adapter_tensors(path), f"a{i}", activate=False, slot_capacity=16)
    pointers = {}
    for name, layer in lora_layers(model):
        pool = layer.row_slots
        assert all(g.capacity == 16 for g in pool.groups.values())
        for n, slot in pool.slots.items():
            a = layer.adapters[n]
            assert a.lora_A.data_ptr() == slot.group.A[slot.index].data_ptr()  # one copy: the slot
            assert a.lora_B.data_ptr() == slot.group.B[slot.index].data_ptr()
            pointers[(name, n)] = a.lora_A.data_ptr()
        assert pool.nbytes() == 3 * (sum(p.numel() for p in layer.adapters["a0"].parameters()) + 1) * 4  # + the scale
    for i in range(3, 10):
        lorakit.load_adapter(model, path, adapter=f"a{i}", activate=False)
    assert all(layer.adapters[n].lora_A.data_ptr() == p for (name, n), p in pointers.items()
               for layer in [model.get_submodule(name)])


class ScaledLora(LoraAdapter):
    """A DoRA-like adapter for the test: `g ⊙ (base(x) − bias + ΔW x) + bias` with a fixed per-feature g."""

    def __init__(self, *args, g=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("g", g)

    def output(self, layer, x, y):
        delta = super().output(layer, x, y)
        bias = layer.bias if layer.bias is not None else 0
        return (self.g - 1) * (y - bias) + self.g * delta

    def fast_forward(self, layer, x, strength):
        return None

    def row_column_scale(self, layer):
        return self.g


def test_a_per_feature_factor_rides_in_the_slot(llama):
    """Rows of a G adapter, of plain adapters of the same rank, and of the base, in one batch."""
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), adapter="plain")
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), adapter="scaled")
    randomise_lora(llama, std=0.1, seed=9)
    g = torch.Generator().manual_seed(3)
    for _, layer in lora_layers(llama):
        old = layer.adapters["scaled"]
        new = ScaledLora(layer.base_layer, layer.type, 4, old.scale, g=1 + 0.3 * torch.randn(layer.features[1], generator=g))
        new.load_state_dict(old.state_dict(), strict=False)
        layer.adapters["scaled"] = new
    names = ["scaled", "plain", None]
    with torch.no_grad():
        got = llama(X, adapter_names=names).logits
        for i, name in enumerate(names):
            if name is None:
                with lorakit.disabled(llama):
                    expected = llama(X[i:i + 1]).logits
            else:
                lorakit.set_active(llama, name)
                expected = llama(X[i:i + 1]).logits
            torch.testing.assert_close(got[i], expected[0], atol=ATOL, rtol=0)
    q = llama.model.layers[0].self_attn.q_proj
    slot = q.row_slots.slots["scaled"]
    assert torch.equal(slot.group.G[slot.index], q.adapters["scaled"].g)
    assert torch.equal(slot.group.G[q.row_slots.slots["plain"].index], torch.ones(q.features[1]))
