"""Per-row adapters: one forward pass in which each row of the batch runs its own adapter, or the base.

Each LoRA layer keeps its adapters in per-rank slots (slots.py). A batch gathers every row's slot and adds
`scale · (x · A_row) · B_row` with two batched products (BGMV) per rank present, so the cost does not grow with
the number of distinct adapters in the batch and switching copies nothing. Adapters that rescale each output
feature (DoRA) also apply their slot's factor `G`; rows of other adapters keep 1.

This module is the math and the per-thread plan; `lorakit.adapters.adapter_rows(model, names)` is the entry point.
Inference only: adapter dropout is not applied and no gradient reaches the adapters.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F

from .errors import LorakitError, MergeStateError
from .slots import SlotGroup, current_slot

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


# --- the per-row forward ----------------------------------------------------------------------------


class RowPlan:
    """The adapter of every row, resolved once per layer into that layer's slots: per rank present, the slot
    of each of its rows (an int when every row of the batch shares one slot) and which rows those are (None:
    all). One plan lives as long as one `adapter_rows` block."""

    def __init__(self, names: tuple[str | None, ...]):
        self.names = names
        self.distinct = {n for n in names if n is not None}
        self._layers: dict[int, tuple] = {}
        self._cache: dict[tuple, object] = {}  # index tensors shared by layers whose adapters sit in the same slots

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        entry = self._layers.get(id(layer))
        if entry is None or entry[0] is not layer:
            entry = self._layers[id(layer)] = (layer, self._prepare(layer))
        parts = entry[1]
        y = layer.base_layer(x)
        if not parts:
            return y
        n = x.shape[0] if x.dim() >= (1 if layer.type.takes_ids else 2) else 0
        scaled = []
        for group, slots, rows, scale in parts:
            slots, rows = self._expand(slots, rows, n, x)
            if rows is None:
                y = _add_slots(layer, group, slots, x, y, self, scale)
            else:  # only these rows: their delta alone, added into theirs
                delta = _add_slots(layer, group, slots, x.index_select(0, rows), None, self, scale).to(y.dtype)
                alpha = 1.0 if scale is None else scale
                y = y.index_add_(0, rows, delta, alpha=alpha) if not torch.is_grad_enabled() else y.index_add(0, rows, delta, alpha=alpha)
            if group.G is not None:
                scaled.append((group, slots, rows))
        return y if not scaled else _rescale(layer, y, _column_factors(scaled, y, n))

    def _prepare(self, layer) -> list[tuple]:
        if layer.merged:
            raise MergeStateError("the model has merged adapters; call lorakit.unmerge(model) before running per-row adapters")
        if layer.base_parts:
            raise MixedBatchError(
                f"adapter {layer.base_parts[0]!r} holds part of the base weight (PiSSA/OLoRA init), so rows without it "
                "would not see the base; save it with lorakit.save_adapter (which writes a plain LoRA for the untouched "
                "base) and load that for per-row batches"
            )
        adapters = layer.adapters._modules
        present = {n: adapters[n] for n in self.distinct if n in adapters}
        if not present:  # no row's adapter reaches this layer: the base alone
            return []
        if not layer.type.per_row:
            raise MixedBatchError(f"per-row adapters support Linear, GPT-2 Conv1D and Embedding layers, not {type(layer.base_layer).__name__}")
        slots = {n: current_slot(layer, n, a) for n, a in present.items()}
        per_row = [slots.get(n) if n is not None else None for n in self.names]
        key = ("parts", tuple(None if s is None else (s.group.key, s.index) for s in per_row))
        layout = self._cached(key, lambda: _layout(per_row))
        groups = {s.group.key: s.group for s in slots.values()}
        parts = []
        for k, slot_index, rows in layout:
            # One scale for every row of the part (the usual case) rides on the final add's alpha: no gather, no pass.
            scales = {s.group.scales[s.index] for s in slots.values() if s.group.key == k}
            parts.append((groups[k], slot_index, rows, scales.pop() if len(scales) == 1 else None))
        return parts

    def _expand(self, slots, rows, n: int, x: torch.Tensor):
        """Slots and rows for an input of `n` rows: generate() repeats each row in place for beams / return sequences."""
        names = len(self.names)
        if n == names:
            return slots, rows
        if not n or n % names:
            raise MixedBatchError(
                f"a LoRA layer got an input of shape {tuple(x.shape)}, whose first dimension does not fit the "
                f"{names} adapter names given; pass one name (or None) per row of the batch"
            )
        if isinstance(slots, int):
            return slots, rows
        k = n // names
        return self._cached(("expand", id(slots), id(rows), k), lambda: (
            slots.repeat_interleave(k),
            None if rows is None else (rows[:, None] * k + torch.arange(k, device=rows.device)).reshape(-1)))

    def _cached(self, key: tuple, make):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value


def _layout(per_row: list) -> list[tuple]:
    """[(rank key, slot of each of its rows, its rows)] from each row's Slot (None: the base)."""
    by_group: dict[tuple, tuple[list[int], list[int]]] = {}
    for i, s in enumerate(per_row):
        if s is not None:
            rows, idx = by_group.setdefault(s.group.key, ([], []))
            rows.append(i)
            idx.append(s.index)
    out = []
    for key, (rows, idx) in by_group.items():
        device = key[2]
        whole = len(rows) == len(per_row)
        if whole and len(set(idx)) == 1:
            out.append((key, idx[0], None))
        else:
            out.append((key, torch.tensor(idx, device=device), None if whole else torch.tensor(rows, device=device)))
    return out


def _add_slots(layer, group: SlotGroup, slots, x: torch.Tensor, y: torch.Tensor | None, plan: RowPlan,
               scale: float | None) -> torch.Tensor:
    """y + each row's `scale · (x · Aᵀ[slot]) · Bᵀ[slot]` for rows whose adapters all sit in `group` (in place into y
    when no graph is recorded). `scale`: the one scale of all these rows, or None to read each row's. With y None,
    the delta alone, shaped like x with the output's width (not multiplied by a common `scale`: the caller does)."""
    if isinstance(slots, int):
        return _add_one(layer, group, slots, x, y)
    if layer.type.takes_ids:
        return _add_embedding_rows(group, slots, x, y, scale)
    x3 = x.reshape(slots.shape[0], -1, x.shape[-1])
    if x3.shape[1] > FEW_TOKENS:
        return _add_rows(group, slots, x3, y, scale)
    in_f, r = group.A.shape[1:]
    index = plan._cached(("bags", id(slots), x3.shape[1], in_f, r), lambda: _bag_index(slots, x3.shape[1], in_f, r))
    return _add_rows_in_place(group, slots, index, x3, y, scale)


def _column_factors(scaled: list[tuple], y: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's per-feature factor G (1 for rows whose adapter has none), shaped to broadcast over its tokens."""
    if len(scaled) == 1 and scaled[0][2] is None:
        group, slots, _ = scaled[0]
        g = group.G[slots]
        if isinstance(slots, int):
            return g
    else:
        g = torch.ones(n, y.shape[-1], dtype=scaled[0][0].G.dtype, device=y.device)
        for group, slots, rows in scaled:
            g[slice(None) if rows is None else rows] = group.G[slots]
    return g.view(g.shape[0], *[1] * (y.dim() - 2), g.shape[1])


def _rescale(layer, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`g ⊙ (y − bias) + bias`: DoRA's per-feature factor applies to the weight's product, not to the bias."""
    bias = layer.bias
    if bias is None:
        return y * g.to(y.dtype)
    return torch.addcmul(bias, y - bias, g.to(y.dtype))


def _add_one(layer, group: SlotGroup, s: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every row runs slot `s`: plain matrix products, at the adapter's own rank."""
    A, B = group.A[s], group.B[s]
    r = A.shape[1]
    t = F.embedding(x, A) if layer.type.takes_ids else x.to(A.dtype) @ A
    return _add(y, t.reshape(-1, r), B, x, group.scales[s])


def _add_rows(group: SlotGroup, slots: torch.Tensor, x3: torch.Tensor, y: torch.Tensor | None,
              scale: float | None) -> torch.Tensor:
    """Row i adds `scale_i · (x_i · A[slot_i]) · B[slot_i]`: gather each row's factors, two batched products (BGMV);
    the scale multiplies the r-wide product, the cheapest place for it."""
    t = torch.bmm(x3.to(group.A.dtype), group.A[slots])
    if scale is None:
        t.mul_(group.scale[slots].view(-1, 1, 1))
    return _add(y, t, group.B[slots], x3, 1.0 if scale is None else scale)


def _add_rows_in_place(group: SlotGroup, slots: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor],
                       x3: torch.Tensor, y: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """The same sum for few tokens per row, without copying any factor: token j of row i is a bag of the
    rows `slot_i·in + k` of A (viewed as (slots·in, r)) weighted by x_ijk; then likewise through B."""
    index_A, index_B = index
    A, B = group.A.view(-1, group.A.shape[-1]), group.B.view(-1, group.B.shape[-1])
    t = F.embedding_bag(index_A, A, per_sample_weights=x3.reshape(-1, x3.shape[-1]).to(A.dtype), mode="sum")
    if scale is None:
        t = t.view(x3.shape[0], x3.shape[1], -1).mul_(group.scale[slots].view(-1, 1, 1)).view(-1, t.shape[-1])
    delta = F.embedding_bag(index_B, B, per_sample_weights=t, mode="sum")
    if y is None:
        return delta.view(*x3.shape[:-1], -1)
    delta, alpha = delta.view(y.shape), 1.0 if scale is None else scale
    if y.dtype == delta.dtype and not torch.is_grad_enabled():
        return y.add_(delta, alpha=alpha)
    return y + alpha * delta.to(y.dtype)


def _bag_index(slots: torch.Tensor, tokens: int, in_f: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (rows × tokens), the rows of the flattened A and B its row's slot owns."""
    index_A = (slots[:, None] * in_f + torch.arange(in_f, device=slots.device)).repeat_interleave(tokens, 0)
    index_B = (slots[:, None] * r + torch.arange(r, device=slots.device)).repeat_interleave(tokens, 0)
    return index_A, index_B


def _add_embedding_rows(group: SlotGroup, slots: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None,
                        scale: float | None) -> torch.Tensor:
    n = slots.shape[0]
    t = group.A[slots.view(-1, *[1] * (x.dim() - 1)), x]  # (n, ..., r): each token's row of its adapter's Aᵀ
    t = t.reshape(n, -1, t.shape[-1])
    if scale is None:
        t = t * group.scale[slots].view(-1, 1, 1)
    return _add(y, t, group.B[slots], x, 1.0 if scale is None else scale)


def _add(y: torch.Tensor | None, t: torch.Tensor, B: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """y + alpha·t·B, in place into y when no graph is recorded (saves a pass over the output); t·B (without alpha)
    shaped like x's rows (with the output's width) when y is None."""
    batched = t.dim() == 3
    if y is None:  # x: the rows' input, ids (for an embedding) or features
        delta = torch.bmm(t, B) if batched else t @ B
        return delta.view(*(x.shape if not x.is_floating_point() else x.shape[:-1]), B.shape[-1])
    if y.dtype == t.dtype and y.is_contiguous() and not torch.is_grad_enabled():
        out = y.view(*t.shape[:-1], y.shape[-1])
        out.baddbmm_(t, B, alpha=alpha) if batched else out.addmm_(t, B, alpha=alpha)
        return y
    delta = torch.bmm(t, B) if batched else t @ B
    return y + alpha * delta.view(y.shape).to(y.dtype)
