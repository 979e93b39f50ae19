"""The continuous-batching engine without HTTP: text deltas and stop strings, sampling, the batch cache,
and rows that join and leave a running batch while computing what they compute alone."""

from __future__ import annotations

import threading

import pytest
import torch

import lorakit
from lorakit.serve.batch_cache import BatchCache
from lorakit.serve.engine import Engine, Job, QueueFullError
from lorakit.serve.sampling import SamplingParams, sample
from lorakit.serve.text import TextStream
from tests.conftest import llama_config, randomise_lora


class CharTokenizer:
    """Token i decodes to one character of its own, chr(256 + i); id 127 is special (skipped)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(256 + i) for i in ids if not (skip_special_tokens and i == 127))


def ch(*ids):
    return "".join(chr(256 + i) for i in ids)


class Pins:
    """An adapter source that counts pins; names in `broken` fail to load."""

    def __init__(self, broken=()):
        self.pins, self.broken = {}, set(broken)

    def acquire(self, name):
        if name in self.broken:
            raise RuntimeError(f"{name} is broken")
        self.pins[name] = self.pins.get(name, 0) + 1
        return name

    def release(self, name):
        self.pins[name] -= 1


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    config = llama_config()
    config.max_position_embeddings, config.eos_token_id = 96, None
    torch.manual_seed(0)
    m = LlamaForCausalLM(config).eval()
    for seed, (name, rank) in enumerate([("a", 2), ("b", 8)]):
        lorakit.inject(m, lorakit.LoraConfig(r=rank, target_modules="all-linear"), adapter=name)
        randomise_lora(m, std=0.3, seed=seed + 1)  # re-randomises earlier adapters too; fine, each is fixed after
    return m


@pytest.fixture
def engine(model):
    e = Engine(model, CharTokenizer(), Pins(), max_batch=3, max_queue=12, eos_token_ids=set()).start()
    yield e
    e.stop()


def run(engine, jobs):
    """Submit (prompt, adapter, params) jobs at once; return (text, finish_reason, tokens) per job."""
    results, texts = [None] * len(jobs), [""] * len(jobs)
    left, lock, done = [len(jobs)], threading.Lock(), threading.Event()

    def sink(i):
        def on_event(event):
            texts[i] += event.text
            if event.finish_reason:
                results[i] = (texts[i], event.finish_reason, event.completion_tokens)
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return on_event

    engine.submit_many([Job(p, params, sink(i), a) for i, (p, a, params) in enumerate(jobs)])
    assert done.wait(timeout=60)
    return results


# --- text -------------------------------------------------------------------------------------------


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_at_it():
    stream = TextStream(CharTokenizer(), stop=(ch(2, 3, 4),))
    out = [stream.push(t) for t in (0, 1, 2, 3)]  # the tail 2 3 might become the stop 2 3 4
    assert out == [(ch(0), False), (ch(1), False), ("", False), ("", False)]
    assert stream.push(4) == ("", True) and stream.text == ch(0, 1)
    stream = TextStream(CharTokenizer(), stop=(ch(2, 3, 4),))
    assert [stream.push(t) for t in (2, 3, 5)] == [("", False), ("", False), (ch(2, 3, 5), False)]  # not a stop after all
    assert stream.flush() == ""


def test_text_stream_skips_special_tokens_and_flushes_the_rest():
    stream = TextStream(CharTokenizer(), stop=(ch(23, 24, 25),))
    assert [stream.push(t) for t in (23, 127, 24)] == [("", False), ("", False), ("", False)]
    assert stream.flush() == ch(23, 24)


def test_text_stream_keeps_the_first_words_space_and_waits_for_whole_characters():
    class SentencePieceLike:  # every token is " w<i>"; a text's first space is dropped, as SentencePiece does
        def decode(self, ids, skip_special_tokens=True):
            return "".join(f" w{i}" for i in ids).removeprefix(" ")

    stream = TextStream(SentencePieceLike(), context=[1, 2])  # the prompt's last tokens
    assert [stream.push(t) for t in (3, 4)] == [(" w3", False), (" w4", False)]

    class Bytes:  # one token per UTF-8 byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    assert [stream.push(t) for t in "aé".encode()] == [("a", False), ("", False), ("é", False)]
    stream.push("€".encode()[0])
    assert stream.flush() == "\ufffd"  # a row that ends inside a character sends what it has


# --- sampling ---------------------------------------------------------------------------------------


def test_sampling_greedy_top_p_and_seeds():
    logits = torch.tensor([1.0, 3.0, 2.9, -5.0])
    assert sample(logits, SamplingParams(temperature=0), torch.Generator()) == 1
    nucleus = {sample(logits, SamplingParams(temperature=1.0, top_p=0.6), torch.Generator().manual_seed(s))
               for s in range(50)}
    assert nucleus == {1, 2}  # 1 and 2 hold ~0.95 of the mass, and 1 alone only ~0.5
    draws = [[sample(logits, SamplingParams(temperature=2.0), g) for _ in range(20)]
             for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


# --- the batch cache --------------------------------------------------------------------------------


def test_batch_cache_pads_on_the_left_and_trims_when_rows_leave():
    from transformers import DynamicCache

    def row(n, value):
        return DynamicCache(ddp_cache_data=[(torch.full((1, 2, n, 4), value), torch.full((1, 2, n, 4), -value))])

    cache = BatchCache()
    cache.add(row(3, 1.0))
    cache.add(row(5, 2.0))
    cache.add(row(2, 3.0))
    assert cache.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    keys = cache.cache.layers[0].keys
    assert keys[:, 0, :, 0].tolist() == [[0, 0, 1, 1, 1], [2, 2, 2, 2, 2], [0, 0, 0, 3, 3]]
    cache.keep([0, 2])  # the longest row leaves: two columns of padding go with it
    assert cache.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert cache.cache.layers[0].values[:, 0, :, 0].tolist() == [[-1, -1, -1], [0, -3, -3]]
    assert cache.grow().tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    cache.keep([])
    assert cache.cache is None and cache.length == 0


# --- the engine -------------------------------------------------------------------------------------


def test_rows_compute_the_same_alone_and_in_a_batch_that_changes(engine):
    greedy = SamplingParams(max_tokens=12, temperature=0)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    jobs = [([3, 4, 5], None, greedy), ([7, 8], "a", greedy), ([1, 2, 3, 4, 5, 6], "b", seeded),
            ([9], "a", seeded), ([3, 4, 5], "b", SamplingParams(max_tokens=5, temperature=0)),
            ([2, 2], None, SamplingParams(max_tokens=20, temperature=0.7, seed=1))]
    alone = [run(engine, [job])[0] for job in jobs]
    together = run(engine, jobs + jobs)  # 12 rows through 3 slots: rows join and leave every few steps
    assert together == alone + alone
    assert [r[1:] for r in alone] == [("length", 12)] * 4 + [("length", 5), ("length", 20)]
    assert engine.stats.max_batch_seen == 3
    assert engine.adapters.pins == {"a": 0, "b": 0}  # every pin released


def test_decode_steps_keep_one_row_plan_until_the_rows_or_slots_change(engine, monkeypatch):
    """The same running rows reuse one per-row plan across decode steps, also while another adapter is loaded; a
    change to the slots of a running row's adapter makes the engine derive a new one, and every row still computes
    what it computes alone."""
    made, plans = [], []
    real = engine._rows_plan

    def rows_plan(adapters):  # records each new decode plan with its rows' adapters (plans kept: ids stay unique)
        plan = real(adapters)
        if not any(p is plan for p in plans):
            plans.append(plan)
            made.append(list(plan.names))
        return plan

    monkeypatch.setattr(engine, "_rows_plan", rows_plan)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    jobs = [([3, 4, 5], "a", greedy), ([7, 8], None, greedy), ([1, 2, 3], "b", greedy)]
    alone = [run(engine, [job])[0] for job in jobs]
    made.clear()
    assert run(engine, jobs) == alone
    assert made == [[None, "a", "b"]]  # 11 decode steps, one plan, rows grouped by adapter (the base first)
    model, made[:] = engine.model, []
    stepped = threading.Event()
    real_decode = engine._decode

    def decode_then_load():
        real_decode()
        if engine.stats.steps == steps_before + 3:  # a new adapter takes slots: the kept plan stays valid
            lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["q_proj"]), adapter="c", activate=False)
            with torch.no_grad():
                model(torch.tensor([[1, 2]]), adapter_names=["c"])
        if engine.stats.steps == steps_before + 5:  # b leaves its slots (put back on next use): the plan is stale
            for layer in [m for m in model.modules() if getattr(m, "row_slots", None) is not None]:
                lorakit.slots.free_slot(layer, "b")
            stepped.set()

    steps_before = engine.stats.steps
    monkeypatch.setattr(engine, "_decode", decode_then_load)
    try:
        assert run(engine, jobs) == alone
    finally:
        lorakit.delete_adapter(model, "c")
    assert stepped.is_set()
    # the kept plan ran through c's load; after b's slots changed a new one, and one more once b was back in slots
    assert made == [[None, "a", "b"]] * 2


def test_eos_stop_strings_and_the_context_limit_finish_rows(engine):
    first = run(engine, [([3, 4], "a", SamplingParams(max_tokens=30, temperature=0))])[0]
    engine.eos_token_ids = {ord(first[0][4]) - 256}  # the 5th token ends the row
    eos = run(engine, [([3, 4], "a", SamplingParams(max_tokens=30, temperature=0))])[0]
    engine.eos_token_ids = set()
    assert eos[1:] == ("eos", first[0].index(first[0][4]) + 1) and first[0].startswith(eos[0])
    stop = run(engine, [([3, 4], "a", SamplingParams(max_tokens=30, temperature=0, stop=(first[0][6:8],)))])[0]
    assert stop[0] == first[0][: first[0].index(first[0][6:8])] and stop[1] == "stop"
    long = run(engine, [(list(range(90)), None, SamplingParams(max_tokens=50, temperature=0))])[0]
    assert long[1:] == ("length", 96 - 90)  # the model's 96 positions bound the row


def test_cancel_queue_full_and_a_broken_adapter(model):
    engine = Engine(model, CharTokenizer(), Pins(broken={"b"}), max_batch=1, max_queue=2, eos_token_ids={127})
    events = []
    with pytest.raises(Exception, match="not running"):
        engine.submit(Job([1], SamplingParams(), events.append))
    engine.start()
    try:
        with engine.model_lock:  # nothing is admitted while we fill the queue
            h1 = engine.submit(Job([1, 2], SamplingParams(max_tokens=5, temperature=0), events.append, "a"))
            engine.submit(Job([1, 2], SamplingParams(max_tokens=5, temperature=0), events.append, "b"))
            with pytest.raises(QueueFullError, match="max_queue=2"):
                engine.submit(Job([1], SamplingParams(), events.append))
            h1.cancel()
        results = run(engine, [([3], "a", SamplingParams(max_tokens=4, temperature=0))])
    finally:
        engine.stop()
    finals = [e for e in events if e.finish_reason]
    assert [e.finish_reason for e in finals] == ["cancelled", "error"]
    assert "b is broken" in finals[1].error and finals[0].completion_tokens == 0
    assert results[0][1:] == ("length", 4)
    assert engine.adapters.pins == {"a": 0}
    assert engine.stats.rejected == 1


def test_batched_and_chunked_prefill_compute_what_rows_compute_alone(model):
    """Prompts of different lengths and adapters prefilled together (left-padded in one forward), or in chunks of a
    few tokens between decode steps, give each row the tokens it gets alone."""
    g = torch.Generator().manual_seed(11)
    jobs = [(torch.randint(0, 120, (n,), generator=g).tolist(), adapter, SamplingParams(max_tokens=6, temperature=0))
            for n, adapter in [(3, "a"), (17, None), (9, "b"), (12, "a"), (5, "b"), (20, "a")]]
    results = {}
    for name, kwargs in {"alone": dict(max_batch=1), "batched": dict(max_batch=6, prefill_tokens=256),
                         "chunked": dict(max_batch=6, prefill_tokens=8)}.items():
        engine = Engine(model, CharTokenizer(), Pins(), max_queue=12, eos_token_ids=set(), **kwargs).start()
        try:
            if name == "alone":
                results[name] = [run(engine, [job])[0] for job in jobs]
            else:
                with engine.model_lock:  # queue them all first, so they are prefilled together
                    done = [None] * len(jobs)
                    threads = [threading.Thread(target=lambda: done.__setitem__(0, run(engine, jobs)))]
                    threads[0].start()
                    while engine.queue_depth < len(jobs):
                        threading.Event().wait(0.01)
                threads[0].join()
                results[name] = done[0]
            results[name + "_stats"] = engine.stats
        finally:
            engine.stop()
    assert results["batched"] == results["alone"] == results["chunked"]
    batched, chunked = results["batched_stats"], results["chunked_stats"]
    assert batched.prefill_rows / batched.prefills > 2  # several prompts per forward
    assert chunked.prefill_forwards > chunked.prefills  # long prompts took several chunks


def test_a_mix_pins_each_adapter_and_equals_the_weighted_active_adapters(model):
    """A row running ((a, 0.6), (b, -0.4)) beside single-adapter and base rows gives the tokens that the adapters
    active with those weights give; the engine pins each adapter of the mix (all or none) and releases them."""
    engine = Engine(model, CharTokenizer(), Pins(broken={"c"}), max_batch=3, max_queue=12, eos_token_ids=set()).start()
    mix, greedy = (("a", 0.6), ("b", -0.4)), SamplingParams(max_tokens=8, temperature=0)
    try:
        results = run(engine, [([3, 4, 5], mix, greedy), ([7, 8], "a", greedy), ([3, 4, 5], None, greedy)])
        broken = run(engine, [([3], (("a", 0.5), ("c", 0.5)), greedy)])[0]
    finally:
        engine.stop()
    before = lorakit.active_adapters(model)
    lorakit.set_active(model, list(mix))
    try:
        ids = [3, 4, 5]
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    finally:
        lorakit.set_active(model, before)
    assert results[0] == (ch(*ids[3:]), "length", 8)
    assert results[0][0] not in (results[2][0], results[1][0])
    assert broken[1:] == ("error", 0)  # "c is broken": the pin it took on a is given back
    assert engine.adapters.pins == {"a": 0, "b": 0}
