"""How the next token is chosen: the sampling parameters of a request, greedy or temperature + nucleus (top_p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False  # report each generated token's log-probability (TGI's details)
    ignore_eos: bool = False


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a row's logits: greedy at temperature 0, else temperature + nucleus (top_p)."""
    if params.temperature <= 0:
        return int(logits.argmax())
    # Drawn where the request's generator lives (the CPU): a seed gives the same draws whatever the model's device.
    probs = torch.softmax(logits.float().to(generator.device) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int) -> float:
    """The model's log-probability of `token` (before temperature or top_p)."""
    return float(torch.log_softmax(logits.float(), dim=-1)[token])
