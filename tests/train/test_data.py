"""Data: formats, prompt masking, bad rows by file and line, splits, packing, batching."""

import pytest

from lorakit import chat
from lorakit.train import data
from lorakit.train.data import IGNORE_INDEX, DataError

from ..conftest import chat_tokenizer, tiny_tokenizer
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


def test_bad_rows_are_an_error_with_file_and_line_unless_skipped(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "completion": " b"}\n{broken\n\n[1, 2]\n{"prompt": 3}\n')
    with pytest.raises(DataError) as info:
        data.load_causal_lm(f, tok)
    msg = str(info.value)
    assert "3 bad row(s) (of 4)" in msg and f"{f}:2: not valid JSON" in msg and f"{f}:4:" in msg and f"{f}:5:" in msg
    assert "--skip-bad-rows" in msg
    ds = data.load_causal_lm(f, tok, skip_bad_rows=True)
    assert len(ds) == 1 and [n for n, _ in ds.bad_rows] == [2, 4, 5] and ds.formats == {"prompt/completion": 1}


def test_only_the_first_five_bad_rows_are_quoted(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "completion": " b"}\n' + "{broken\n" * 8)
    msg = str(pytest.raises(DataError, data.load_causal_lm, f, tok).value)
    assert msg.count("not valid JSON") == 5 and "... and 3 more" in msg and "8 bad row(s) (of 9)" in msg


def test_no_usable_row_is_an_error(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"no usable row.*d.jsonl:1"):
        data.load_causal_lm(f, tok, skip_bad_rows=True)
    with pytest.raises(DataError, match="does not exist"):
        data.load_causal_lm(tmp_path / "missing.jsonl", tok)


def test_classification_csv_and_jsonl(tmp_path, tok):
    f = tmp_path / "d.csv"
    f.write_text('text,label\nhello there,pos\n"bye, now",neg\n,pos\n')
    with pytest.raises(DataError, match=r"d.csv:4: missing or empty 'text'"):
        data.load_classification(f, tok)
    ds = data.load_classification(f, tok, skip_bad_rows=True)
    assert ds.bad_rows == [(4, "missing or empty 'text'")]
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


# --- chat rows ---------------------------------------------------------------------------------


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "done"}]


def targets(tok, example):
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_messages_rows_learn_the_assistant_turns_only(tmp_path):
    tok = chat_tokenizer()
    (ex,) = data.load_causal_lm(write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}]), tok).examples
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert targets(tok, ex) == "yo</s>\ndone</s>\n"  # each answer with its end-of-turn: the model learns to stop
    first = ex.labels.index(next(t for t in ex.labels if t != IGNORE_INDEX))
    assert ex.input_ids[:first] == chat.prompt_ids(tok, CONVERSATION[:2])  # what the server sends for that turn
    assert ex.completion == "yo" and ex.prompt == "<s>system\nbe brief</s>\n<s>user\nhi</s>\n<s>assistant\n"


def test_conversational_prompt_completion_and_chat_template_flag_give_the_same_tokens(tmp_path):
    tok = chat_tokenizer()
    rows = [{"messages": CONVERSATION[1:3]}, {"prompt": CONVERSATION[1:2], "completion": CONVERSATION[2:3]},
            {"prompt": "hi", "completion": "yo"}]
    ds = data.load_causal_lm(write_jsonl(tmp_path / "a.jsonl", rows), tok, chat_template=True)
    assert ds.formats == {"messages (chat template)": 1, "conversational prompt/completion (chat template)": 1,
                          "prompt/completion (chat template)": 1}
    assert all(e.input_ids == ds.examples[0].input_ids and e.labels == ds.examples[0].labels for e in ds.examples)
    plain = data.load_causal_lm(write_jsonl(tmp_path / "b.jsonl", rows[2:]), tok).examples[0]
    assert plain.input_ids != ds.examples[0].input_ids  # without the flag: plain text, no template
    # a prompt that is itself a conversation: only the completion's assistant turns are trained
    row = {"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:]}
    (ex,) = data.load_causal_lm(write_jsonl(tmp_path / "c.jsonl", [row]), tok).examples
    assert targets(tok, ex) == "done</s>\n"


def test_bad_chat_rows_name_the_problem(tmp_path):
    rows = [{"messages": [{"role": "bot", "content": "x"}]}, {"messages": CONVERSATION[:2]},
            {"messages": [{"role": "user", "content": 3}]}, {"text": "plain"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    msg = str(pytest.raises(DataError, data.load_causal_lm, path, chat_tokenizer(), chat_template=True).value)
    assert f"{path}:1: message 0 has role 'bot'" in msg and f"{path}:2: no assistant message" in msg
    assert f"{path}:3: message 0 (user) has no text content" in msg and f"{path}:4: a 'text' row has no roles" in msg
    msg = str(pytest.raises(DataError, data.load_causal_lm, path, tiny_tokenizer()).value)
    assert f"{path}:2: no assistant message" in msg  # checked before the template is needed
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": CONVERSATION}])
    msg = str(pytest.raises(DataError, data.load_causal_lm, good, tiny_tokenizer()).value)
    assert f"{good}:1: the tokenizer has no chat template" in msg

