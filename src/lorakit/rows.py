"""Per-row adapters: one forward pass in which each row of the batch runs its own adapter, or the base.

Each LoRA layer keeps its adapters stacked into zero-padded tensors, slot 0 being the base (all zeros).
A batch gathers every row's slot and adds `(x · A_row) · B_row` with two batched products (BGMV), so
the cost does not grow with the number of distinct adapters in the batch and switching copies nothing.
Adapters that rescale each output feature (DoRA) also stack that factor; rows of other adapters keep 1.

This module is the math and the per-thread plan; `lorakit.adapters.adapter_rows(model, names)` is the entry point.
Inference only: adapter dropout is not applied and no gradient reaches the adapters.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .errors import LorakitError, MergeStateError

# Which adapter each row of the batch runs. Every LoRA layer called in that context (thread or asyncio task)
# follows it instead of its active adapters; a context variable, not a layer attribute, so threads can run
# different row plans on one model at once.
_PLAN: contextvars.ContextVar = contextvars.ContextVar("lorakit_row_plan", default=None)

# Up to this many tokens per row (decoding), each row's factors are read in place by embedding_bag; beyond,
# gathering them once per row and running batched matrix products is faster (measured on CPU: crossover ~8-16).
FEW_TOKENS = 8


class MixedBatchError(LorakitError, ValueError):
    """A per-row adapter batch that cannot be computed: wrong number of names, or an unsupported layer."""


def current_plan() -> "RowPlan | None":
    return _PLAN.get()


@contextlib.contextmanager
def use_plan(names: tuple[str | None, ...]) -> Iterator[None]:
    """Run every LoRA layer called inside this block (this thread / task) per row; names are checked by the caller."""
    token = _PLAN.set(RowPlan(names))
    try:
        yield
    finally:
        _PLAN.reset(token)


# --- each layer's adapters, stacked -----------------------------------------------------------------


@dataclass(eq=False)
class AdapterStack:
    """One layer's adapters as zero-padded tensors: slot 0 is the base, slot i the i-th adapter."""

    items: tuple  # ((name, adapter), ...) it was built from (compared by identity)
    slots: dict[str, int]
    ranks: list[int]  # per slot; 0 for the base
    versions: list[tuple]  # per slot: the adapter's row_version() when its slot was copied
    A: torch.Tensor  # (slots, in, r_max): Aᵀ, zero beyond each adapter's rank
    B: torch.Tensor  # (slots, r_max, out): scale · Bᵀ
    G: torch.Tensor | None  # (slots, out): per-feature factor (DoRA), 1 elsewhere; None when no adapter has one


def layer_stack(layer, used: set[str] | None = None) -> AdapterStack | None:
    """`layer`'s cached stack, rebuilt when its adapters were added or deleted, or when one of the adapters
    in `used` (all if None) changed since it was built. None when the layer holds no adapter."""
    # One C-level copy: a store may add or delete adapters from another thread while this runs.
    items = tuple(layer.adapters._modules.items())
    if not items:
        return None
    stack = layer.row_stack
    if stack is not None and stack.items == items:
        if all(stack.versions[s] == a.row_version() for s, (name, a) in enumerate(items, 1) if used is None or name in used):
            return stack
    stack = _build_stack(layer, items)
    layer.row_stack = stack
    return stack


def _build_stack(layer, items: tuple) -> AdapterStack:
    if not layer.type.per_row:
        raise MixedBatchError(f"per-row adapters support Linear, GPT-2 Conv1D and Embedding layers, not {type(layer.base_layer).__name__}")
    versions = [()] + [a.row_version() for _, a in items]  # before reading the data: a racing write shows up later
    in_f, out_f = layer.features
    # Normal tensors even when called under inference_mode, so a later forward with gradients can read them.
    with torch.inference_mode(False), torch.no_grad():
        factors = [a.row_factors(layer) for _, a in items]
        scales = [a.row_column_scale(layer) for _, a in items]
        ranks = [0] + [At.shape[1] for At, _ in factors]
        dtype = functools.reduce(torch.promote_types, [At.dtype for At, _ in factors])
        device = factors[0][0].device
        A = torch.zeros(len(items) + 1, in_f, max(ranks), dtype=dtype, device=device)
        B = torch.zeros(len(items) + 1, max(ranks), out_f, dtype=dtype, device=device)
        for s, (At, Bt) in enumerate(factors, 1):
            A[s, :, : ranks[s]] = At
            B[s, : ranks[s]] = Bt
        G = None
        if any(g is not None for g in scales):
            G = torch.ones(len(items) + 1, out_f, dtype=dtype, device=device)
            for s, g in enumerate(scales, 1):
                if g is not None:
                    G[s] = g
    slots = {name: s for s, (name, _) in enumerate(items, 1)}
    return AdapterStack(items, slots, ranks, versions, A, B, G)


def clear_stacks(model) -> None:
    """Drop every layer's cached stack (they are rebuilt on the next per-row batch); frees their memory."""
    for module in model.modules():
        if hasattr(module, "row_stack"):
            module.row_stack = None


# --- the per-row forward ----------------------------------------------------------------------------


class RowPlan:
    """The adapter of every row, resolved once per layer into that layer's stack slots (an int when all
    rows share one slot, else a tensor of slots). One plan lives as long as one `adapter_rows` block."""

    def __init__(self, names: tuple[str | None, ...]):
        self.names = names
        self.distinct = {n for n in names if n is not None}
        self._layers: dict[int, tuple] = {}
        self._cache: dict[tuple, object] = {}  # slot tensors and indices shared by layers with the same adapters

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        entry = self._layers.get(id(layer))
        if entry is None or entry[0] is not layer:
            entry = self._layers[id(layer)] = self._prepare(layer)
        _, stack, slots = entry
        y = layer.base_layer(x)
        if isinstance(slots, int):
            if slots == 0:
                return y
            y = _add_one(layer, stack, slots, x, y)
            return y if stack.G is None else _rescale(layer, y, stack.G[slots])
        rows = self._cached(("rows", id(slots), x.shape[0] if x.dim() else 0), lambda: _expand(slots, x, layer))
        if layer.type.takes_ids:
            y = _add_embedding_rows(stack, rows, x, y)
        else:
            x3 = x.reshape(rows.shape[0], -1, x.shape[-1])
            if x3.shape[1] > FEW_TOKENS:
                y = _add_rows(stack, rows, x3, y)
            else:
                in_f, r = stack.A.shape[1:]
                index = self._cached(("bags", id(rows), x3.shape[1], in_f, r), lambda: _bag_index(rows, x3.shape[1], in_f, r))
                y = _add_rows_in_place(stack, index, x3, y)
        if stack.G is None:
            return y
        g = stack.G[rows]  # (rows, out): broadcast over each row's tokens
        return _rescale(layer, y, g.view(g.shape[0], *[1] * (y.dim() - 2), g.shape[1]))

    def _prepare(self, layer):
        if layer.merged:
            raise MergeStateError("the model has merged adapters; call lorakit.unmerge(model) before running per-row adapters")
        if layer.base_parts:
            raise MixedBatchError(
                f"adapter {layer.base_parts[0]!r} holds part of the base weight (PiSSA/OLoRA init), so rows without it "
                "would not see the base; save it with lorakit.save_adapter (which writes a plain LoRA for the untouched "
                "base) and load that for per-row batches"
            )
        adapters = layer.adapters._modules
        present = {n for n in self.distinct if n in adapters}
        if not present:  # no row's adapter reaches this layer: the base alone
            return layer, None, 0
        stack = layer_stack(layer, present)
        ids = [stack.slots.get(n, 0) if n is not None else 0 for n in self.names]
        if len(set(ids)) == 1:
            return layer, stack, ids[0]
        return layer, stack, self._cached(("slots", tuple(ids), stack.A.device), lambda: torch.tensor(ids, device=stack.A.device))

    def _cached(self, key: tuple, make):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value


def _expand(slots: torch.Tensor, x: torch.Tensor, layer) -> torch.Tensor:
    """The slot of each of x's rows (its first dimension)."""
    rows = x.shape[0] if x.dim() >= (1 if layer.type.takes_ids else 2) else 0
    if rows == len(slots):
        return slots
    if rows and rows % len(slots) == 0:  # generate() repeats each row in place for beams / num_return_sequences
        return slots.repeat_interleave(rows // len(slots))
    raise MixedBatchError(
        f"a LoRA layer got an input of shape {tuple(x.shape)}, whose first dimension does not fit the "
        f"{len(slots)} adapter names given; pass one name (or None) per row of the batch"
    )


def _rescale(layer, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`g ⊙ (y − bias) + bias`: DoRA's per-feature factor applies to the weight's product, not to the bias."""
    bias = layer.bias
    if bias is None:
        return y * g.to(y.dtype)
    return torch.addcmul(bias, y - bias, g.to(y.dtype))


def _add_one(layer, stack: AdapterStack, s: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every row runs slot `s`: plain matrix products, at the adapter's own rank."""
    r = stack.ranks[s]
    A, B = stack.A[s, :, :r], stack.B[s, :r]
    t = F.embedding(x, A) if layer.type.takes_ids else x.to(A.dtype) @ A
    return _add(y, t.reshape(-1, r), B)


def _add_rows(stack: AdapterStack, slots: torch.Tensor, x3: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row i adds `(x_i · A[slot_i]) · B[slot_i]`: gather each row's factors, two batched products (BGMV)."""
    t = torch.bmm(x3.to(stack.A.dtype), stack.A[slots])
    return _add(y, t, stack.B[slots])


def _add_rows_in_place(stack: AdapterStack, index: tuple[torch.Tensor, torch.Tensor], x3: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """The same sum for few tokens per row, without copying any factor: token j of row i is a bag of the
    rows `slot_i·in + k` of A (viewed as (slots·in, r)) weighted by x_ijk; then likewise through B."""
    index_A, index_B = index
    A, B = stack.A.view(-1, stack.A.shape[-1]), stack.B.view(-1, stack.B.shape[-1])
    t = F.embedding_bag(index_A, A, per_sample_weights=x3.reshape(-1, x3.shape[-1]).to(A.dtype), mode="sum")
    delta = F.embedding_bag(index_B, B, per_sample_weights=t, mode="sum").view(y.shape)
    if y.dtype == delta.dtype and not torch.is_grad_enabled():
        return y.add_(delta)
    return y + delta.to(y.dtype)


def _bag_index(slots: torch.Tensor, tokens: int, in_f: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (rows × tokens), the rows of the flattened A and B its row's slot owns."""
    index_A = (slots[:, None] * in_f + torch.arange(in_f, device=slots.device)).repeat_interleave(tokens, 0)
    index_B = (slots[:, None] * r + torch.arange(r, device=slots.device)).repeat_interleave(tokens, 0)
    return index_A, index_B


def _add_embedding_rows(stack: AdapterStack, slots: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = slots.shape[0]
    t = stack.A[slots.view(-1, *[1] * (x.dim() - 1)), x]  # (n, ..., r): each token's row of its adapter's Aᵀ
    return _add(y, t.reshape(n, -1, t.shape[-1]), stack.B[slots])


def _add(y: torch.Tensor, t: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """y + t·B, in place into y when no graph is recorded (saves a pass over the output)."""
    batched = t.dim() == 3
    if y.dtype == t.dtype and y.is_contiguous() and not torch.is_grad_enabled():
        out = y.view(*t.shape[:-1], y.shape[-1])
        out.baddbmm_(t, B) if batched else out.addmm_(t, B)
        return y
    delta = torch.bmm(t, B) if batched else t @ B
    return y + delta.view(y.shape).to(y.dtype)
