"""Data: formats, prompt masking, bad rows by file and line, splits, packing, batching."""

import pytest

from lorakit.train import data
from lorakit.train.data import IGNORE_INDEX, DataError

from ..conftest import tiny_tokenizer
from .helpers import write_jsonl


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_prompt_completion_masks_the_prompt(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab:", "completion": " xy"}])
    (ex,) = data.load_causal_lm(f, tok).examples
    prompt_ids = tok("ab:")["input_ids"]  # <s> a b :
    assert ex.input_ids == prompt_ids + tok(" xy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert ex.labels[len(prompt_ids):] == ex.input_ids[len(prompt_ids):]
    assert ex.prompt == "ab:" and ex.completion == " xy"


def test_instruction_and_text_formats(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Do", "input": "it", "output": "ok"}, {"text": "free text"}])
    inst, text = data.load_causal_lm(f, tok).examples
    n_prompt = sum(1 for label in inst.labels if label == IGNORE_INDEX)
    assert inst.input_ids[:n_prompt] == tok("### Instruction:\nDo\n\nit\n\n### Response:\n")["input_ids"]
    assert text.labels[1:] == text.input_ids[1:]  # plain text: every token after BOS is a target


def test_bad_rows_are_reported_with_file_and_line(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "completion": " b"}\n{broken\n\n[1, 2]\n{"prompt": 3}\n')
    with pytest.warns(UserWarning) as w:
        ds = data.load_causal_lm(f, tok)
    assert len(ds) == 1
    msg = str(w[0].message)
    assert "3 bad row" in msg and f"{f}:2: not valid JSON" in msg and f"{f}:4:" in msg and f"{f}:5:" in msg


def test_no_usable_row_is_an_error(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"no usable row.*d.jsonl:1"), pytest.warns(UserWarning):
        data.load_causal_lm(f, tok)
    with pytest.raises(DataError, match="does not exist"):
        data.load_causal_lm(tmp_path / "missing.jsonl", tok)


def test_classification_csv_and_jsonl(tmp_path, tok):
    f = tmp_path / "d.csv"
    f.write_text('text,label\nhello there,pos\n"bye, now",neg\n,pos\n')
    with pytest.warns(UserWarning, match=r"d.csv:4: missing or empty 'text'"):
        ds = data.load_classification(f, tok)
    assert ds.label_names == ["neg", "pos"] and [e.labels for e in ds.examples] == [1, 0]
    j = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": 2}])
    assert data.load_classification(j, tok).label_names == ["0", "1", "2"]


def test_split_is_seeded_and_disjoint(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(50)])
    ds = data.load_causal_lm(f, tok)
    tr, ev = data.split(ds, 0.2, seed=3)
    tr2, ev2 = data.split(ds, 0.2, seed=3)
    assert len(ev) == 10 and len(tr) == 40
    assert [e.line for e in ev.examples] == [e.line for e in ev2.examples]
    assert not {e.line for e in ev.examples} & {e.line for e in tr.examples}
    assert [e.line for e in data.split(ds, 0.2, seed=4)[1].examples] != [e.line for e in ev.examples]


def test_collate_pads_and_masks(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " bc"}, {"prompt": "abcd", "completion": " e"}])
    ex = data.load_causal_lm(f, tok).examples
    right = data.collate(ex, tok.pad_token_id)
    left = data.collate(ex, tok.pad_token_id, pad_left=True)
    assert right["input_ids"].shape == left["input_ids"].shape
    assert right["attention_mask"].sum() == left["attention_mask"].sum() == sum(len(e.input_ids) for e in ex)
    assert (right["labels"][right["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_packing_keeps_every_token(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "abcdefghij" * (i + 1)} for i in range(6)])
    ex = data.load_causal_lm(f, tok).examples
    blocks = data.pack(ex, 32)
    assert all(len(b.input_ids) == 32 for b in blocks[:-1])
    assert sum(len(b.input_ids) for b in blocks) == sum(len(e.input_ids) for e in ex)
