"""Training data: read JSONL/CSV rows, refuse (or skip) bad ones by file and line, tokenise with prompt masking, batch.

Row formats (the first that fits wins):
  causal-lm:  {"messages": [{"role": ..., "content": ...}, ...]}  (the chat template; loss on assistant turns)
              | {"prompt": [messages], "completion": [messages]}  (TRL's conversational form; loss on the completion)
              | {"prompt": ..., "completion": ...} | {"instruction": ..., "input": ..., "output": ...} | {"text": ...}
  classify:   {"text": ..., "label": ...}   (JSONL or CSV with a header)
With `chat_template=True` prompt/completion and instruction rows go through the chat template too.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import chat
from ..errors import ChatTemplateError, LorakitError

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens, padding)
SHOWN_BAD_ROWS = 5  # bad rows quoted in an error or a summary; metrics.json keeps them all


class DataError(LorakitError, ValueError):
    """A data file is missing, unreadable, or has no usable row."""


@dataclass
class Example:
    """One tokenised row: `labels` is IGNORE_INDEX wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int] | int
    line: int
    prompt: str | None = None  # for exact-match evaluation by generation (the tokens before the first target)
    completion: str | None = None


@dataclass
class Dataset:
    examples: list[Example]
    label_names: list[str] = field(default_factory=list)  # classify only
    path: str = ""
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (line, problem), skipped on request
    formats: dict[str, int] = field(default_factory=dict)  # row format -> rows, e.g. {"messages (chat template)": 80}

    def __len__(self) -> int:
        return len(self.examples)


# --- reading -----------------------------------------------------------------------------------


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (line number, row, problem) for every non-blank line / CSV record."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DataError(f"{path}: the CSV file has no header row (expected columns text,label)")
            for row in reader:
                yield reader.line_num, row, None
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"not valid JSON ({e.msg})"
                continue
            if not isinstance(row, dict):
                yield lineno, None, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield lineno, row, None


def _causal_parts(row: dict[str, Any], chat_template: bool) -> tuple[str, list | str, int | str] | str:
    """(format, messages, first trained message) for rows that go through the chat template,
    (format, prompt, completion) for plain text, or a problem description."""
    def text(key):
        v = row.get(key)
        return v if isinstance(v, str) else None

    if "messages" in row:
        messages = chat.check_messages(row["messages"])
        return messages if isinstance(messages, str) else ("messages (chat template)", messages, 0)
    if isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        messages = chat.check_messages(row["prompt"] + row["completion"])
        kind = "conversational prompt/completion (chat template)"
        return messages if isinstance(messages, str) else (kind, messages, len(row["prompt"]))
    if text("prompt") is not None and text("completion") is not None:
        prompt, completion, kind = row["prompt"], row["completion"], "prompt/completion"
    elif text("instruction") is not None and text("output") is not None:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if text("input") else "")
        completion, kind = row["output"], "instruction/output"
        if not chat_template:
            prompt = f"### Instruction:\n{prompt}\n\n### Response:\n"
    elif text("text") is not None:
        if chat_template:
            return "a 'text' row has no roles for --chat-template; use 'messages' or 'prompt'/'completion' rows"
        return "text", "", row["text"]
    else:
        return ("needs 'messages', a 'text' field, 'prompt' and 'completion', or 'instruction' and 'output' "
                "(strings)")
    if chat_template:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return f"{kind} (chat template)", turns, 0
    return kind, prompt, completion


def load_causal_lm(path: str | Path, tokenizer, max_length: int = 512, skip_bad_rows: bool = False,
                   chat_template: bool = False) -> Dataset:
    """Tokenise rows; the loss covers completions and assistant turns (and their end) only, never the prompt.

    A bad row is an error naming its file and line, unless `skip_bad_rows` (then `Dataset.bad_rows` lists it).
    """
    examples, bad, formats = [], [], Counter()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for lineno, row, problem in read_rows(path):
        parts = _causal_parts(row, chat_template) if row is not None else problem
        if isinstance(parts, str):
            bad.append((lineno, parts))
            continue
        kind, *rest = parts
        try:
            encoded = _encode_chat(tokenizer, *rest) if isinstance(rest[0], list) else _encode_text(tokenizer, *rest, eos)
        except ChatTemplateError as e:
            bad.append((lineno, str(e)))
            continue
        if isinstance(encoded, str):
            bad.append((lineno, encoded))
            continue
        ids, labels, prompt, completion = encoded
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            bad.append((lineno, f"the prompt is longer than max_length={max_length}: nothing left to learn "
                                "(raise --max-length)"))
            continue
        formats[kind] += 1
        examples.append(Example(ids, labels, lineno, prompt, completion))
    return _finish(path, examples, bad, skip_bad_rows, dict(formats))


def _encode_text(tokenizer, prompt: str, completion: str, eos: list[int]):
    if not completion.strip():
        return "empty completion/text"
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else _bos(tokenizer)
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
    labels = [IGNORE_INDEX] * len(p_ids) + c_ids
    return p_ids + c_ids, labels, (prompt if prompt else None), (completion if prompt else None)


def _encode_chat(tokenizer, messages: list[dict[str, str]], first_target: int):
    turns = [m for m in messages[first_target:] if m["role"] == "assistant"]
    if not turns:
        return "no assistant message to learn from" + (" in the completion" if first_target else "")
    if not any(m["content"].strip() for m in turns):
        return "every assistant message is empty"
    ids, trained = chat.conversation_ids(tokenizer, messages, first_target)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]
    prompt_len = trained.index(True) if True in trained else len(ids)
    # Exact match asks the model to continue the tokens before the first trained one; it should say this turn.
    return ids, labels, tokenizer.decode(ids[:prompt_len]), turns[0]["content"]


def load_classification(path: str | Path, tokenizer, max_length: int = 512,
                        label_names: list[str] | None = None, skip_bad_rows: bool = False) -> Dataset:
    rows, bad = [], []
    for lineno, row, problem in read_rows(path):
        if row is None:
            bad.append((lineno, problem))
            continue
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            bad.append((lineno, "missing or empty 'text'"))
        elif label is None or (isinstance(label, str) and not label.strip()):
            bad.append((lineno, "missing 'label'"))
        else:
            rows.append((lineno, text, str(label).strip()))
    names = list(label_names) if label_names else sorted({r[2] for r in rows}, key=_label_sort_key)
    index = {n: i for i, n in enumerate(names)}
    examples = []
    for lineno, text, label in rows:
        if label not in index:
            bad.append((lineno, f"label {label!r} is not one of {names}"))
            continue
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        examples.append(Example(ids, index[label], lineno))
    ds = _finish(path, examples, bad, skip_bad_rows, {"text/label": len(examples)})
    ds.label_names = names
    return ds


def _label_sort_key(label: str):
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _finish(path, examples: list[Example], bad: list[tuple[int, str]], skip_bad_rows: bool,
            formats: dict[str, int]) -> Dataset:
    bad = sorted(bad)
    if bad and not skip_bad_rows:
        raise DataError(f"{path} has {len(bad)} bad row(s) (of {len(bad) + len(examples)}):\n"
                        + describe_bad_rows(path, bad)
                        + "\nFix them, or pass --skip-bad-rows to train on the other rows (the skipped lines are then "
                          "listed in the summary, diagnostics.txt and metrics.json).")
    if not examples:
        first = f" First problem: {path}:{bad[0][0]}: {bad[0][1]}." if bad else ""
        raise DataError(f"{path} has no usable row.{first}")
    return Dataset(examples, path=str(path), bad_rows=bad, formats=formats)


def describe_bad_rows(path, bad: list[tuple[int, str]], shown: int = SHOWN_BAD_ROWS) -> str:
    """The first `shown` bad rows as `file:line: problem` lines, and how many more there are."""
    lines = [f"  {path}:{n}: {p}" for n, p in bad[:shown]]
    if len(bad) > shown:
        lines.append(f"  ... and {len(bad) - shown} more")
    return "\n".join(lines)


# --- splitting and batching --------------------------------------------------------------------


def split(dataset: Dataset, eval_fraction: float, seed: int, max_eval: int | None = None) -> tuple[Dataset, Dataset]:
    """A held-out eval split, chosen by `seed` so the same rows are held out on every run."""
    n = len(dataset)
    n_eval = int(round(n * eval_fraction))
    if max_eval is not None:
        n_eval = min(n_eval, max_eval)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, min(n_eval, n - 1))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(dataset.examples) if i not in held]
    evals = [e for i, e in enumerate(dataset.examples) if i in held]
    return Dataset(train, dataset.label_names, dataset.path), Dataset(evals, dataset.label_names, dataset.path)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch; depends only on (seed, epoch), so a resumed run replays it exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def collate(examples: list[Example], pad_id: int, pad_left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest row; labels are padded with IGNORE_INDEX (causal) or stacked (classify)."""
    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        if pad_left:
            ids.append([pad_id] * pad + e.input_ids)
            mask.append([0] * pad + [1] * len(e.input_ids))
        else:
            ids.append(e.input_ids + [pad_id] * pad)
            mask.append([1] * len(e.input_ids) + [0] * pad)
        if isinstance(e.labels, list):
            labels.append(([IGNORE_INDEX] * pad + e.labels) if pad_left else (e.labels + [IGNORE_INDEX] * pad))
        else:
            labels.append(e.labels)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate rows into `max_length` blocks (for plain-text data): no padding is wasted.

    Labels keep their masks, so packed prompt/completion rows still learn completions only.
    """
    blocks, ids, labels = [], [], []
    for e in examples:
        ids.extend(e.input_ids)
        labels.extend(e.labels)
        while len(ids) >= max_length:
            blocks.append(Example(ids[:max_length], labels[:max_length], e.line))
            ids, labels = ids[max_length:], labels[max_length:]
    if ids and any(t != IGNORE_INDEX for t in labels[1:]):
        blocks.append(Example(ids, labels, examples[-1].line))
    return blocks
