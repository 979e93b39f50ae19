"""Summed losses and their counts, so accumulation and data parallelism can divide by the global count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses over the target tokens, and how many there are.

    Why not `model(..., labels=...)`: that applies the vocabulary head to every position. Here the head
    runs only on positions whose next token is a target — for prompt/completion data with a 49k vocabulary
    that is most of the head's cost saved.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    count = int(keep.sum())
    head = _plain_head(model)
    if head is None:  # heads with extra logic (soft-capping, scaling): let the model compute all logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"), count
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), count


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), int(batch["labels"].numel())


def loss_fn(task: str):
    return causal_lm_loss if task == "causal-lm" else classification_loss


def _plain_head(model: nn.Module):
    """The LM head if logits are exactly head(last hidden state) for this model type, else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    if type(model).__name__ not in _PLAIN_HEAD_MODELS:
        return None
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return None
    return model.get_output_embeddings()


# Causal LMs whose forward is `lm_head(backbone(...).last_hidden_state)` with nothing in between.
_PLAIN_HEAD_MODELS = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel",
    "GPTNeoXForCausalLM", "OPTForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "SmolLM3ForCausalLM",
}
