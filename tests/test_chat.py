"""One way to turn a conversation into tokens: training rows, `lorakit generate --chat` and the server's
/v1/chat/completions agree, so an adapter is asked exactly what it was taught."""

from types import SimpleNamespace

import torch

import lorakit
from lorakit import chat
from lorakit.serve.api_models import ChatRequest
from lorakit.serve.server import _encode_chat
from lorakit.train import data

from .conftest import chat_tokenizer, load
from .train.helpers import letter_rows, write_jsonl


def chat_rows(n):
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in letter_rows(n)]


def test_training_generate_and_the_server_build_the_same_prompt(tmp_path):
    tok = chat_tokenizer()
    messages = [{"role": "system", "content": "answer v or c"}, {"role": "user", "content": "w: a\nc:"},
                {"role": "assistant", "content": " v"}]
    (ex,) = data.load_causal_lm(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]), tok).examples
    first_target = next(i for i, t in enumerate(ex.labels) if t != data.IGNORE_INDEX)
    request = ChatRequest(model="m", messages=[{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                                               for m in messages[:2]])
    served = _encode_chat(SimpleNamespace(tokenizer=tok), request)
    assert ex.input_ids[:first_target] == chat.prompt_ids(tok, messages[:2]) == served
    assert tok.decode(served) == "<s>system\nanswer v or c</s>\n<s>user\nw: a\nc:</s>\n<s>assistant\n"


def test_train_on_chat_rows_then_generate_with_chat(cli, chat_lm_dir, tmp_path):
    rows = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    code, out, _ = cli("train", "--base", chat_lm_dir, "--data", rows, "--out", tmp_path / "run", "--max-steps", "2",
                       "--batch-size", "8", "--targets", "all-linear")
    assert code == 0 and f"data: {rows}: 40 messages (chat template) row(s)" in out
    code, out, _ = cli("generate", "--base", chat_lm_dir, "--adapter", tmp_path / "run", "--prompt", "w: a\nc:",
                       "--chat", "--max-new-tokens", "4", "--threads", "1")
    assert code == 0
    model = lorakit.load_adapter(load(chat_lm_dir), tmp_path / "run")
    tok = chat_tokenizer()
    ids = torch.tensor([chat.prompt_ids(tok, [{"role": "user", "content": "w: a\nc:"}])])
    want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert out == f"--- [{tmp_path / 'run'}] 'w: a\\nc:'\n{tok.decode(want, skip_special_tokens=True)}\n"


def test_chat_without_a_template_is_refused_with_the_way_out(cli, lm_dir, tmp_path):
    rows = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    code, _, err = cli("train", "--base", lm_dir, "--data", rows, "--out", tmp_path / "run")
    assert code == 2 and f"{rows}:1: the tokenizer has no chat template" in err and "... and" not in err
    code, _, err = cli("generate", "--base", lm_dir, "--prompt", "hi", "--chat")
    assert code == 2 and "the tokenizer has no chat template" in err and "tokenizer.chat_template" in err
