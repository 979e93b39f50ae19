"""Evaluation on the held-out split: loss and perplexity, accuracy and F1, exact match of generated completions."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..device import model_device, to_device
from .data import IGNORE_INDEX, Dataset, Example, collate
from .loss import loss_fn


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, task: str, pad_id: int, batch_size: int = 16,
             tokenizer=None, exact_match: bool = True) -> dict[str, float]:
    was_training = model.training
    device = model_device(model)  # the batches go where the model is
    model.eval()
    try:
        total, count = 0.0, 0
        for i in range(0, len(dataset), batch_size):
            loss, n = loss_fn(task)(model, to_device(collate(dataset.examples[i:i + batch_size], pad_id), device))
            total, count = total + float(loss), count + n
        metrics = {"eval_loss": total / max(count, 1)}
        if task == "causal-lm":
            metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
            pairs = [e for e in dataset.examples if e.prompt is not None]
            if exact_match and tokenizer is not None and pairs:
                metrics["exact_match"] = exact_match_rate(model, tokenizer, pairs, batch_size)
        else:
            metrics.update(classification_metrics(model, dataset, pad_id, batch_size))
        return metrics
    finally:
        model.train(was_training)


def classification_metrics(model: nn.Module, dataset: Dataset, pad_id: int, batch_size: int) -> dict[str, float]:
    preds, golds = [], []
    for i in range(0, len(dataset), batch_size):
        batch = to_device(collate(dataset.examples[i:i + batch_size], pad_id), model_device(model))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        preds += logits.argmax(-1).tolist()
        golds += batch["labels"].tolist()
    return {"accuracy": sum(p == g for p, g in zip(preds, golds)) / len(golds), "f1_macro": macro_f1(preds, golds)}


def macro_f1(preds: list[int], golds: list[int]) -> float:
    scores = []
    for c in sorted(set(golds) | set(preds)):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def generate_completions(model: nn.Module, tokenizer, prompts: list[str] | list[list[int]], max_new_tokens: int,
                         batch_size: int = 16) -> list[str]:
    """Greedy completions (of prompt texts or token ids), batched with left padding."""
    outputs = []
    eos = tokenizer.eos_token_id
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        examples = [Example(p if isinstance(p, list) else tokenizer(p, add_special_tokens=True)["input_ids"], 0, 0)
                    for p in chunk]
        batch = to_device(collate(examples, tokenizer.pad_token_id, pad_left=True), model_device(model))
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos)
        new = out[:, batch["input_ids"].shape[1]:].cpu()
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def exact_match_rate(model: nn.Module, tokenizer, examples: list[Example], batch_size: int = 16) -> float:
    """Share of prompts whose greedy completion (stripped) equals the reference completion (stripped)."""
    longest = max(len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples)
    # The tokens the model was trained to continue (chat rows: the template's prompt, as the server sends it).
    prompts = [e.input_ids[: next(i for i, t in enumerate(e.labels) if t != IGNORE_INDEX)] for e in examples]
    got = generate_completions(model, tokenizer, prompts, longest + 1, batch_size)
    return sum(_normal(g) == _normal(e.completion) for g, e in zip(got, examples)) / len(examples)


def _normal(text: str) -> str:
    """Compare answers, not formatting: first line, case, spacing and trailing punctuation are ignored."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return " ".join(first.split()).lower().strip(" .,;:!?\"'")
