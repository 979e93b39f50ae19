"""Per-row adapters: a mixed batch computes for every row what that row computes alone with its adapter
(or the base), for Linear and GPT-2 Conv1D layers, with padding, in generate() with a cache, and in threads."""

import copy
import threading

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterNotFoundError, MergeStateError
from lorakit.state import lora_layers
from lorakit.adapters import adapter_rows
from lorakit import rows as rows_module
from lorakit.rows import MixedBatchError

from .conftest import alone, randomise_lora, rows_alone
from .conftest import row_ids as ids

ATOL = 1e-5


@pytest.fixture
def llama3(llama):
    """Three adapters with different ranks, scales and targets: not every layer holds every adapter."""
    lorakit.inject(llama, LoraConfig(r=4, target_modules="all-linear"), adapter="a")
    lorakit.inject(llama, LoraConfig(r=8, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]), adapter="b")
    lorakit.inject(llama, LoraConfig(r=2, rslora=True, target_modules=["o_proj", "up_proj"]), adapter="c")
    randomise_lora(llama, std=0.1)
    return llama


@pytest.fixture
def gpt2_2(gpt2):
    """GPT-2's Conv1D layers (weights stored (in, out)), two ranks."""
    lorakit.inject(gpt2, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]), adapter="a")
    lorakit.inject(gpt2, LoraConfig(r=6, alpha=3, target_modules=["c_attn"]), adapter="b")
    randomise_lora(gpt2, std=0.1)
    return gpt2


NAMES = [
    ["a", "b", None, "c", "b", "a"],  # every adapter, a base row, repeats
    ["b", "b", "b", "b", "b", "b"],  # one adapter for all rows
    [None] * 6,  # the base only
    ["c", None, None, None, None, None],
]


@pytest.mark.parametrize("names", NAMES, ids=["mixed", "uniform", "base", "one-row"])
@pytest.mark.parametrize("length", [10, 3], ids=["batched-products", "few-tokens"])  # the two ways to compute rows
def test_llama_mixed_batch_equals_rows_alone(llama3, names, length):
    x = ids(len(names), length)
    expected = rows_alone(llama3, x, names)
    with torch.no_grad():
        got = llama3(x, adapter_names=names).logits
        with adapter_rows(llama3, names):
            got_ctx = llama3(x).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(got, got_ctx)


def test_rows_really_differ(llama3):
    """The adapters change the output, so the equalities above are not base = base."""
    x = ids(1).expand(4, -1)
    with torch.no_grad():
        out = llama3(x, adapter_names=["a", "b", "c", None]).logits
    for i in range(4):
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max() > 1e-2


@pytest.mark.parametrize("length", [10, 2])
def test_gpt2_conv1d_mixed_batch(gpt2_2, length):
    names = ["b", None, "a", "a", "b"]
    x = ids(len(names), length)
    with torch.no_grad():
        got = gpt2_2(x, adapter_names=names).logits
    torch.testing.assert_close(got, rows_alone(gpt2_2, x, names), atol=ATOL, rtol=0)


def test_embedding_layers_mixed(llama):
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), adapter="a")
    lorakit.inject(llama, LoraConfig(r=2, target_modules=["embed_tokens"]), adapter="b")
    randomise_lora(llama, std=0.1)
    x = ids(4)
    for names in (["a", "b", None, "b"], ["b"] * 4):
        with torch.no_grad():
            got = llama(x, adapter_names=names).logits
        torch.testing.assert_close(got, rows_alone(llama, x, names), atol=ATOL, rtol=0)


def test_padding_with_attention_mask(llama3):
    """Right-padded rows of different lengths: each row's real positions match the row run alone, unpadded."""
    names, lengths = ["a", None, "c", "b"], [10, 4, 7, 9]
    x = ids(len(names))
    mask = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])
    with torch.no_grad():
        got = llama3(x, attention_mask=mask, adapter_names=names).logits
    for i, (name, n) in enumerate(zip(names, lengths)):
        torch.testing.assert_close(got[i, :n], alone(llama3, x[i : i + 1, :n], name)[0], atol=ATOL, rtol=0)


def generate_alone(model, prompt, name, **kw):
    kw.setdefault("attention_mask", torch.ones_like(prompt))  # else a prompt token equal to pad_token_id is masked
    if name is None:
        with lorakit.disabled(model):
            return model.generate(prompt, **kw)
    lorakit.set_active(model, name)
    return model.generate(prompt, **kw)


@pytest.mark.parametrize("fixture", ["llama3", "gpt2_2"])
def test_greedy_generate_equals_rows_alone(fixture, request):
    model = request.getfixturevalue(fixture)
    names = ["a", None, "b", "a"] if fixture == "gpt2_2" else ["a", None, "b", "c"]
    x = ids(len(names), length=6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    mixed = model.generate(x, attention_mask=torch.ones_like(x), adapter_names=names, **kw)
    for i, name in enumerate(names):
        assert torch.equal(mixed[i], generate_alone(model, x[i : i + 1], name, **kw)[0]), f"row {i} ({name})"
    assert len({tuple(r[-8:].tolist()) for r in mixed}) > 1  # the rows did not all produce the same text


def test_greedy_generate_left_padded(llama3):
    """Prompts of different lengths, left-padded in one batch, each row against its unpadded prompt alone."""
    names, lengths = ["c", "a", None], [6, 3, 5]
    x = ids(len(names), length=6)
    mask = torch.tensor([[0] * (6 - n) + [1] * n for n in lengths])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = llama3.generate(x, attention_mask=mask, adapter_names=names, **kw)
    for i, (name, n) in enumerate(zip(names, lengths)):
        assert torch.equal(mixed[i, 6:], generate_alone(llama3, x[i : i + 1, 6 - n :], name, **kw)[0, n:])


def test_sampling_generate(llama3):
    """Sampling: each row's first-step logits are its own adapter's; one adapter for all rows samples exactly
    what the active adapter samples with the same seed; num_return_sequences repeats each row's adapter."""
    names = ["b", None, "a"]
    x = ids(3, length=5)
    kw = dict(max_new_tokens=4, do_sample=True, top_k=0, pad_token_id=0, attention_mask=torch.ones_like(x))
    out = llama3.generate(x, adapter_names=names, output_logits=True, return_dict_in_generate=True,
                          num_return_sequences=2, **kw)
    assert out.sequences.shape == (6, 9)
    first = out.logits[0]  # (6, vocab): rows expanded in place, 0,0,1,1,2,2
    expected = rows_alone(llama3, x, names)[:, -1]
    torch.testing.assert_close(first, expected.repeat_interleave(2, dim=0), atol=ATOL, rtol=0)

    torch.manual_seed(7)
    mixed = llama3.generate(x, adapter_names=["a"] * 3, **kw)
    lorakit.set_active(llama3, "a")
    torch.manual_seed(7)
    assert torch.equal(mixed, llama3.generate(x, **kw))


def test_switching_copies_nothing_and_slots_are_kept(llama3):
    x = ids(3)
    with torch.no_grad():
        llama3(x, adapter_names=["a", "b", "c"])
        ptrs = {n: p.data_ptr() for n, p in llama3.named_parameters()}
        slots = {n: dict(layer.row_slots.slots) for n, layer in lora_layers(llama3)}
        llama3(x, adapter_names=["c", None, "a"])
        llama3(x, adapter_names=["b", "b", "b"])
    assert {n: p.data_ptr() for n, p in llama3.named_parameters()} == ptrs
    assert {n: dict(layer.row_slots.slots) for n, layer in lora_layers(llama3)} == slots  # same slots: nothing re-copied


@pytest.mark.parametrize("length", [10, 2], ids=["batched-products", "few-tokens"])
def test_slots_follow_adapter_changes(llama3, length):
    """Adding, deleting and changing an adapter in place (a training step, a load) refresh only what they touch;
    with few tokens, the layer's kept copy of the batch's factors side by side (STACK_MAX_RANK) is made anew."""
    x = ids(3, length)
    with torch.no_grad():
        llama3(x, adapter_names=["a", "b", "c"])
    q = llama3.model.layers[0].self_attn.q_proj
    slot_a = q.row_slots.slots["a"]
    lorakit.inject(llama3, LoraConfig(r=3, target_modules=["q_proj"]), adapter="d")
    randomise_lora(llama3, std=0.1, seed=5)  # every factor changes in place
    names = ["d", "a", "b"]
    with torch.no_grad():
        got = llama3(x, adapter_names=names).logits
    assert q.row_slots.slots["a"].index == slot_a.index and q.row_slots.slots["a"].group is slot_a.group  # refreshed in place
    torch.testing.assert_close(got, rows_alone(llama3, x, names), atol=ATOL, rtol=0)
    lorakit.delete_adapter(llama3, "b")
    assert "b" not in q.row_slots.slots
    with torch.no_grad():
        got = llama3(x, adapter_names=["d", "a", None]).logits
    torch.testing.assert_close(got, rows_alone(llama3, x, ["d", "a", None]), atol=ATOL, rtol=0)


def test_few_tokens_side_by_side_equals_the_slots_path(llama3, monkeypatch):
    """Decode-sized rows run the batch's adapters side by side (one product each for A and B, a mask per row);
    the result equals the slots' gathered path, which larger total ranks use, and the generic rows-alone result.
    The side-by-side factors are kept on the layer and reused by the next batch of the same adapters."""
    names = ["a", None, "b", "c", "a", "b"]
    x = ids(len(names), 1)
    monkeypatch.setattr(rows_module, "MAX_RUNS", 0)  # rows not grouped by adapter (else each group runs in place)
    with torch.no_grad():
        stacked = llama3(x, adapter_names=names).logits
    q = llama3.model.layers[0].self_attn.q_proj
    kept = q.row_slots.stacked
    assert kept is not None and kept[1].shape == (q.features[0], 4 + 8)  # a (r=4) and b (r=8) side by side
    with torch.no_grad():
        again = llama3(x.flip(0), adapter_names=list(reversed(names))).logits
    assert q.row_slots.stacked[1] is kept[1]  # same adapters, other rows: the copy is reused
    monkeypatch.setattr(rows_module, "STACK_MAX_RANK", 0)
    forget_layouts(llama3)
    q.row_slots.stacked = None
    with torch.no_grad():
        gathered = llama3(x, adapter_names=names).logits
    assert q.row_slots.stacked is None  # the slots' gathered path this time
    torch.testing.assert_close(stacked, gathered, atol=ATOL, rtol=0)
    torch.testing.assert_close(stacked, rows_alone(llama3, x, names), atol=ATOL, rtol=0)
    torch.testing.assert_close(again, stacked.flip(0), atol=ATOL, rtol=0)


def forget_layouts(model):
    """Drop each layer's kept per-row layout, so that the next batch re-derives it (after a path limit changed)."""
    for _, layer in lora_layers(model):
        if layer.row_slots is not None:
            layer.row_slots.prepared = None


@pytest.mark.parametrize("length", [10, 1], ids=["batched-products", "few-tokens"])
def test_rows_grouped_by_adapter_run_each_group_in_place(llama3, monkeypatch, length):
    """Consecutive rows of one adapter (as a server keeps them) run that adapter's two products on their own rows;
    the result equals the other paths' and each row's alone; more than MAX_RUNS groups take the other paths."""
    names = ["a", "a", None, "b", "b", "b", "c"]
    x = ids(len(names), length)
    calls = []
    real = rows_module.add_runs
    monkeypatch.setattr(rows_module, "add_runs", lambda *a: calls.append(len(a[3])) or real(*a))
    with torch.no_grad():
        grouped = llama3(x, adapter_names=names).logits
    assert calls and max(calls) == 2  # two groups where two adapters meet (q_proj: a and b; o_proj: a and c)
    monkeypatch.setattr(rows_module, "MAX_RUNS", 1)
    forget_layouts(llama3)
    calls.clear()
    with torch.no_grad():
        other = llama3(x, adapter_names=names).logits
    assert calls and max(calls) == 1  # layers with one group (k_proj: a only) still run in place; the others do not
    torch.testing.assert_close(grouped, other, atol=ATOL, rtol=0)
    torch.testing.assert_close(grouped, rows_alone(llama3, x, names), atol=ATOL, rtol=0)


def test_a_kept_plan_runs_again_until_a_slot_changes(llama3):
    """lorakit.adapters.row_plan: one checked plan run for several batches of the same rows gives what fresh plans
    give, stays valid while other adapters come and go, and goes stale as soon as a slot of one of its adapters
    changes (refreshed, freed)."""
    from lorakit.adapters import row_plan

    names = ["a", None, "b"]
    x = ids(3, 1)
    with torch.no_grad():
        fresh = llama3(x, adapter_names=names).logits  # a's and b's first per-row use puts them in slots
    plan = row_plan(llama3, names)
    with torch.no_grad():
        for _ in range(2):
            with adapter_rows(llama3, plan):
                torch.testing.assert_close(llama3(x).logits, fresh, atol=0, rtol=0)
    assert not plan.stale()
    with torch.no_grad():
        llama3(x, adapter_names=["c"] * 3)  # c's first per-row use puts it in slots: not one of the plan's adapters
    lorakit.delete_adapter(llama3, "c")
    assert not plan.stale()
    randomise_lora(llama3, std=0.1, seed=9)  # a's and b's weights change in place
    with torch.no_grad():
        changed = llama3(x, adapter_names=names).logits  # a fresh plan sees it and refreshes their slots
    assert plan.stale()
    torch.testing.assert_close(changed, rows_alone(llama3, x, names), atol=ATOL, rtol=0)
    plan = row_plan(llama3, names)
    lorakit.delete_adapter(llama3, "b")
    assert plan.stale()


def test_a_trusted_plan_takes_slots_as_they_are(llama3):
    """row_plan(..., trust_slots=True) (a server's: its adapters change only through slots) does not re-read the
    adapters' tensors: after an in-place change it still runs the slots' copies, while a default plan refreshes them."""
    from lorakit.adapters import row_plan

    names = ["a", None, "b"]
    x = ids(3, 2)
    for name, p in llama3.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)  # trainable: their slots hold copies (a frozen adapter's tensors are its slot)
    with torch.no_grad():
        before = llama3(x, adapter_names=names).logits
    randomise_lora(llama3, std=0.1, seed=11)
    with torch.no_grad():
        with adapter_rows(llama3, row_plan(llama3, names, trust_slots=True)):
            trusted = llama3(x).logits
        fresh = llama3(x, adapter_names=names).logits
    torch.testing.assert_close(trusted, before, atol=0, rtol=0)
    torch.testing.assert_close(fresh, rows_alone(llama3, x, names), atol=ATOL, rtol=0)
    assert (fresh - before).abs().max() > 1e-3


def test_normal_path_is_untouched(llama3):
    x = ids(2)
    lorakit.set_active(llama3, "b")
    with torch.no_grad():
        before = llama3(x).logits
        llama3(x, adapter_names=["a", "c"])
        assert torch.equal(llama3(x).logits, before)
    assert lorakit.active_adapters(llama3) == [("b", 1.0)]


def test_threads_run_their_own_rows(llama3):
    """The row plan lives in a context variable: two threads on one model do not see each other's."""
    x = ids(2)
    plans = [["a", "b"], ["c", None], ["b", "a"]]
    expected = [rows_alone(llama3, x, p) for p in plans]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                with torch.no_grad():
                    got = llama3(x, adapter_names=plans[i]).logits
                torch.testing.assert_close(got, expected[i], atol=ATOL, rtol=0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_deepcopy_keeps_the_keyword_on_the_copy(llama3):
    x = ids(2)
    twin = copy.deepcopy(llama3)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01)
        mine = llama3(x, adapter_names=["a", None]).logits
        theirs = twin(x, adapter_names=["a", None]).logits
    assert not torch.allclose(mine, theirs)  # the copy runs its own weights, not the original's
    torch.testing.assert_close(mine, rows_alone(llama3, x, ["a", None]), atol=ATOL, rtol=0)


def test_bad_inputs(llama3):
    x = ids(3)
    with pytest.raises(AdapterNotFoundError, match=r"'zz'.*\['a', 'b', 'c'\]"):
        llama3(x, adapter_names=["a", "zz", None])
    with pytest.raises(MixedBatchError, match="3 rows"):
        llama3(x, adapter_names=["a", "b"])
    with pytest.raises(MixedBatchError, match="one adapter name"):
        llama3(x, adapter_names="a")
    with pytest.raises(MixedBatchError, match="one adapter name"):
        llama3(x, adapter_names=[])
    with pytest.raises(MixedBatchError, match="does not fit the 2 adapter names"), adapter_rows(llama3, ["a", "b"]):
        llama3(x)
    lorakit.merge(llama3, "a")
    with pytest.raises(MergeStateError, match="unmerge"):
        llama3(x, adapter_names=["a", None, "b"])
    lorakit.unmerge(llama3)
    llama3(x, adapter_names=["a", None, "b"])


def test_conv2d_is_refused_clearly():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    lorakit.inject(model, LoraConfig(r=2, target_modules=["0"]), adapter="a")
    with pytest.raises(MixedBatchError, match="Conv2d"), adapter_rows(model, ["a", None]):
        model(torch.randn(2, 3, 5, 5))
    with adapter_rows(model, [None, None]):  # base rows never touch the adapters
        model(torch.randn(2, 3, 5, 5))
