"""Per-row adapters: one forward pass in which each row of the batch runs its own adapter, a weighted mix of
adapters, or the base.

Each LoRA layer keeps its adapters in per-rank slots (slots.py) and adds each row's `scale · (x · A_row) · B_row`
in the cheapest of three ways (measured on CPU, docs/benchmarks.md "Decode step"):
- rows grouped by adapter (a server keeps its running rows so), at most MAX_RUNS groups: each group's two products
  on its own rows, in place;
- few tokens per row (decoding) and a small total rank: all the batch's adapters side by side, one product with
  their A's, a mask keeping each row's own columns, one product with their B's (the copy kept per layer);
- otherwise the slots gathered per row: two batched products (BGMV) per rank present, so the cost does not grow
  with the number of distinct adapters in the batch and switching copies nothing.
Adapters that rescale each output feature (DoRA) also apply their slot's factor `G` (rows of other adapters keep 1),
on the last path only.

A row may run a mix `((name, weight), ...)`: the weighted sum of the adapters' changes, as `set_active` with
weights computes it, without building a combined adapter. The k-th adapter of every mixed row is one more
pass of the same products over the slots ("lane" k), its weight folded into the row's scale. An adapter whose
change is not a plain low-rank sum (DoRA inside a mix), or that has no slots at all (a learned mixture router),
runs its own `output()` on its rows instead.

This module is the per-thread plan (which path each layer takes); row_products.py holds the products themselves;
`lorakit.adapters.adapter_rows(model, names)` is the entry point.
Inference only: adapter dropout is not applied and no gradient reaches the adapters.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from .errors import LorakitError, MergeStateError
from . import slots as slot_store
from .row_products import (FEW_TOKENS, add_into_rows, add_runs, add_slots, add_stacked, column_factors,
                           rescale)
from .slots import SlotGroup, current_slot

# Which adapter each row of the batch runs. Every LoRA layer called in that context (thread or asyncio task)
# follows it instead of its active adapters; a context variable, not a layer attribute, so threads can run
# different row plans on one model at once.
_PLAN: contextvars.ContextVar = contextvars.ContextVar("lorakit_row_plan", default=None)

# Up to this total rank of the distinct adapters in a batch, few-token rows run all of them side by side instead:
# one product with their A's placed side by side, a mask keeping each row's own columns (times its scale), one
# product with their B's stacked. Three ops per layer whatever the number of ranks, against ~4 per rank present
# for the slots' gathers; the masked-out columns cost little while the total rank stays small (see STACK_MAX_RANK
# in docs/benchmarks.md, "Decode step").
STACK_MAX_RANK = 128
# ... and up to this many distinct adapters: with more, the batch's set changes at nearly every step (a server with
# many adapters), so the side-by-side copy would be remade each time, and the gathered path is as fast without it.
STACK_MAX_ADAPTERS = 4


class MixedBatchError(LorakitError, ValueError):
    """A per-row adapter batch that cannot be computed: wrong number of names, or an unsupported layer."""


def current_plan() -> "RowPlan | None":
    return _PLAN.get()


# One row's choice: None (the base), an adapter's name, or a mix of (name, weight) pairs (lorakit.adapters.check_names
# makes a mix of one adapter at weight 1 its plain name).
RowChoice = str | tuple[tuple[str, float], ...] | None


def adapters_of(choice: RowChoice) -> tuple[str, ...]:
    """The adapters a row's choice runs (none for the base)."""
    if choice is None:
        return ()
    return (choice,) if isinstance(choice, str) else tuple(name for name, _ in choice)


@contextlib.contextmanager
def use_plan(names: "tuple[RowChoice, ...] | RowPlan") -> Iterator[None]:
    """Run every LoRA layer called inside this block (this thread / task) per row; names are checked by the caller.
    Given a RowPlan (one kept from an earlier block, not stale), its per-layer layouts are reused."""
    token = _PLAN.set(names if isinstance(names, RowPlan) else RowPlan(names))
    try:
        yield
    finally:
        _PLAN.reset(token)


# --- the per-row forward ----------------------------------------------------------------------------


class RowPlan:
    """The adapter of every row, resolved once per layer into that layer's slots: per rank present, the slot
    of each of its rows (an int when every row of the batch shares one slot), which rows those are (None:
    all) and their scale (one float, or one per row in a mix); plus the adapters run through their own output()
    on their rows. One plan usually lives as long as one `adapter_rows` block; an owner that alone changes the
    model's adapters, and only through their slots (a server's engine), may keep it for the next batch of the
    same rows until `stale()`: layouts are then not re-derived, nor adapters' versions re-read, at every layer."""

    def __init__(self, names: tuple[RowChoice, ...], trust_slots: bool = False):
        self.names = names
        # Trusted: an adapter already in a slot is taken as it is, without re-reading its tensors' versions (a
        # server's adapters change only through their slots; a training loop's change in place, so by default not).
        self.trust_slots = trust_slots
        self.mixed = any(type(n) is tuple for n in names)
        if self.mixed:
            self.distinct = {a for n in names for a in adapters_of(n)}
        else:
            self.distinct = {n for n in names if n is not None}
        self._changes = {name: slot_store.changes(name) for name in self.distinct}
        self._layers: dict[int, tuple] = {}
        self._cache: dict[tuple, object] = {}  # index tensors shared by layers whose adapters sit in the same slots

    def stale(self) -> bool:
        """True once a slot of one of the plan's adapters changed since it was made (published anew, refreshed,
        freed); other adapters coming and going leave it valid."""
        return any(slot_store.changes(name) != n for name, n in self._changes.items())

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        entry = self._layers.get(id(layer))
        if entry is None or entry[0] is not layer:
            entry = self._layers[id(layer)] = (layer, self._prepare(layer))
        parts, own, stack, runs = entry[1]
        y = layer.base_layer(x)
        if not parts and not own:
            return y
        n = x.shape[0] if x.dim() >= (1 if layer.type.takes_ids else 2) else 0
        if runs is not None and y.dtype == runs[0][2].group.A.dtype and y.is_contiguous() and not torch.is_grad_enabled():
            return add_runs(y, x, n, runs, _repeats(len(self.names), n, x))
        if stack is not None and x.dim() >= 2 and x[0].numel() <= FEW_TOKENS * x.shape[-1]:
            return add_stacked(layer, y, x, n, *self._stack_mask(stack, n, x))
        # Adapters run through their own output() read the base output, so before the slots add into y in place.
        outputs = [self._own_output(layer, x, y, n, *o) for o in own] if own else ()
        scaled = []
        for group, slots, rows, scale in parts:
            slots, rows, scale = self._expand(slots, rows, scale, n, x)
            if rows is None:
                y = add_slots(layer, group, slots, x, y, self, scale)
            else:  # only these rows: their delta alone, added into theirs
                delta = add_slots(layer, group, slots, x.index_select(0, rows), None, self, scale).to(y.dtype)
                y = add_into_rows(y, rows, delta, scale if type(scale) is float else 1.0)
            if group.G is not None:
                scaled.append((group, slots, rows))
        if scaled:
            y = rescale(layer, y, column_factors(scaled, y, n))
        for rows, delta in outputs:  # rows run by their own output() have no G: after the rescale, or before, alike
            y = y + delta if rows is None else add_into_rows(y, rows, delta, 1.0)
        return y

    def _prepare(self, layer) -> tuple[list[tuple], list[tuple] | tuple]:
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
            return [], (), None, None
        if not layer.type.per_row:
            raise MixedBatchError(f"per-row adapters support Linear, GPT-2 Conv1D and Embedding layers, not {type(layer.base_layer).__name__}")
        if self.mixed or not all(a.per_row for a in present.values()):
            return *self._prepare_lanes(layer, present), None, None
        slots = {n: self._slot(layer, n, a) for n, a in present.items()}
        # What follows depends only on the names and the slots: consecutive decode steps (new plans, same rows) reuse
        # the layer's last result. Slots compare by identity and are held by the key, so a new one never matches.
        state = (self.names, tuple(sorted((n, s, s.version) for n, s in slots.items())))
        last = layer.row_slots.prepared
        if last is not None and last[0] == state:
            return last[1]
        prepared = self._prepare_slots(layer, slots)
        layer.row_slots.prepared = (state, prepared)
        return prepared

    def _slot(self, layer, name: str, adapter):
        if self.trust_slots:
            slot = layer.row_slots.slots.get(name) if layer.row_slots is not None else None
            if slot is not None and slot.adapter is adapter:
                return slot
        return current_slot(layer, name, adapter)

    def _prepare_slots(self, layer, slots: dict) -> tuple[list[tuple], tuple, tuple | None]:
        per_row = [slots.get(n) if n is not None else None for n in self.names]
        key = ("parts", tuple(None if s is None else (s.group.key, s.index) for s in per_row))
        layout = self._cached(key, lambda: _layout(per_row))
        groups = {s.group.key: s.group for s in slots.values()}
        parts = []
        for k, slot_index, rows in layout:
            # One scale for every row of the part (the usual case) rides on the final add's alpha: no gather, no pass.
            scales = {s.group.scales[s.index] for s in slots.values() if s.group.key == k}
            parts.append((groups[k], slot_index, rows, scales.pop() if len(scales) == 1 else None))
        return parts, (), self._stack(layer, per_row, parts), _runs(layer, per_row)

    def _stack(self, layer, per_row: list, parts: list) -> tuple | None:
        """(the distinct slots in order, the key of each row's columns and scale) when this layer's few-token rows
        can run all the batch's adapters side by side (add_stacked); None when the slots' own path is as cheap or
        the only one that applies."""
        if layer.type.takes_ids or (len(parts) == 1 and isinstance(parts[0][1], int)):
            return None  # ids (an embedding) have no product to share; one slot for all rows is already two products
        # In slot order, not row order: the same adapters in other rows reuse the layer's kept copy.
        order = sorted({s for s in per_row if s is not None}, key=lambda s: (s.group.key[0], s.index))
        if (len(order) > STACK_MAX_ADAPTERS or sum(s.group.key[0] for s in order) > STACK_MAX_RANK
                or len({s.group.key[1:] for s in order}) > 1
                or any(s.group.G is not None for s in order)):  # DoRA's factor G stays on the slots' path
            return None
        position = {id(s): i for i, s in enumerate(order)}
        rows = tuple(None if s is None else (position[id(s)], s.group.scales[s.index]) for s in per_row)
        return tuple(order), (tuple(s.group.key[0] for s in order), rows)

    def _stack_mask(self, stack: tuple, n: int, x: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """The slots and, per row, its adapter's scale over that adapter's columns and 0 elsewhere (n rows: generate()
        repeats each name's row in place)."""
        order, key = stack
        mask = self._cached(("stack", key, n), lambda: _stack_mask(*key, _repeats(len(self.names), n, x), order[0].group))
        return order, mask

    def _prepare_lanes(self, layer, present: dict) -> tuple[list[tuple], list[tuple]]:
        """Parts for a batch with mixes (or adapters without slots): lane k holds the k-th slotted adapter of every
        row, its weight folded into the row's scale; a row's single adapter is lane 0 at weight 1 (DoRA keeps its G
        there). Adapters without slots, and DoRA inside a mix, run their own output() on their rows."""
        n = len(self.names)
        lanes: list[tuple[list, list]] = []  # per lane: each row's Slot (or None) and weight
        own: dict[str, tuple[list[int], list[float]]] = {}  # adapter -> its rows and their weights
        slots: dict[str, object] = {}
        for i, choice in enumerate(self.names):
            if choice is None:
                continue
            single = isinstance(choice, str)
            k = 0
            for name, weight in ((choice, 1.0),) if single else choice:
                a = present.get(name)
                if a is None:  # this adapter does not adapt this layer
                    continue
                if not a.per_row or not (single or a.low_rank_delta):
                    rows, weights = own.setdefault(name, ([], []))
                    rows.append(i)
                    weights.append(weight)
                    continue
                slot = slots.get(name)
                if slot is None:
                    slot = slots[name] = self._slot(layer, name, a)
                if k == len(lanes):
                    lanes.append(([None] * n, [0.0] * n))
                lanes[k][0][i], lanes[k][1][i] = slot, weight
                k += 1
        parts = []
        for k, (per_row, weights) in enumerate(lanes):
            key = ("lane", k, tuple(None if s is None else (s.group.key, s.index, s.group.scales[s.index] * w)
                                    for s, w in zip(per_row, weights)))
            groups = {s.group.key: s.group for s in per_row if s is not None}
            parts += [(groups[g], *rest) for g, *rest in self._cached(key, lambda: _lane_layout(per_row, weights))]
        own_parts = []
        device = layer.weight.device
        for name, (rows, weights) in own.items():
            whole = rows == list(range(n))
            weight = weights[0] if len(set(weights)) == 1 else torch.tensor(weights, device=device)
            own_parts.append((present[name], None if whole else torch.tensor(rows, device=device), weight))
        return parts, own_parts

    def _own_output(self, layer, x: torch.Tensor, y: torch.Tensor, n: int, adapter, rows, weight):
        """(rows, weight · the adapter's own output on those rows), from the base output y (rows None: all)."""
        _, rows, weight = self._expand(None, rows, weight, n, x)
        if rows is not None:
            x, y = x.index_select(0, rows), y.index_select(0, rows)
        delta = adapter.output(layer, x, y)
        if type(weight) is not float:
            delta = delta * weight.to(delta.dtype).view(-1, *[1] * (delta.dim() - 1))
        elif weight != 1.0:
            delta = delta * weight
        return rows, delta.to(y.dtype)

    def _expand(self, slots, rows, scale, n: int, x: torch.Tensor):
        """Slots, rows and scale for an input of `n` rows: generate() repeats each row in place for beams / return
        sequences."""
        k = _repeats(len(self.names), n, x)
        if k == 1 or isinstance(slots, int):
            return slots, rows, scale
        per_row = isinstance(scale, torch.Tensor)
        slots, rows, per_row_scale = self._cached(("expand", id(slots), id(rows), id(scale) if per_row else None, k), lambda: (
            None if slots is None else slots.repeat_interleave(k),
            None if rows is None else (rows[:, None] * k + torch.arange(k, device=rows.device)).reshape(-1),
            scale.repeat_interleave(k) if per_row else None))
        return slots, rows, per_row_scale if per_row else scale

    def _cached(self, key: tuple, make):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value


# Rows grouped by adapter (a server keeps its running rows so) run each group's two products on its own rows, in place:
# no gather, no mask, no work for other rows. Used up to this many groups; beyond, the other paths.
MAX_RUNS = 4


def _runs(layer, per_row: list) -> tuple | None:
    """((start, end, slot), ...) for the consecutive rows sharing one slot, when there are at most MAX_RUNS such runs."""
    if layer.type.takes_ids:
        return None
    runs, start = [], 0
    for i in range(1, len(per_row) + 1):
        if i == len(per_row) or per_row[i] is not per_row[start]:
            slot = per_row[start]
            if slot is not None:
                if slot.group.G is not None or len(runs) == MAX_RUNS:
                    return None
                runs.append((start, i, slot))
            start = i
    return tuple(runs) or None


def _repeats(names: int, n: int, x: torch.Tensor) -> int:
    """How many rows of the input each name covers (generate() repeats a row per beam / return sequence)."""
    if n == names:
        return 1
    if not n or n % names:
        raise MixedBatchError(
            f"a LoRA layer got an input of shape {tuple(x.shape)}, whose first dimension does not fit the "
            f"{names} adapter names given; pass one name (or None) per row of the batch"
        )
    return n // names


def _stack_mask(ranks: tuple[int, ...], rows: tuple, repeats: int, group: SlotGroup) -> torch.Tensor:
    """(rows, total rank): row i holds its adapter's scale over that adapter's columns, 0 elsewhere (a base row: 0)."""
    starts = [sum(ranks[:j]) for j in range(len(ranks) + 1)]
    mask = [[0.0] * starts[-1] for _ in rows]
    for line, row in zip(mask, rows):
        if row is not None:
            j, scale = row
            line[starts[j]:starts[j + 1]] = [scale] * ranks[j]
    mask = torch.tensor(mask, dtype=group.A.dtype, device=group.A.device)
    return mask if repeats == 1 else mask.repeat_interleave(repeats, 0)


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


def _lane_layout(per_row: list, weights: list[float]) -> list[tuple]:
    """[(rank key, slot of each of its rows, its rows, scale)] for one lane: the scale is `slot scale × weight`, one
    float when all the part's rows share it, else a tensor with each row's."""
    by_group: dict[tuple, tuple[list[int], list[int], list[float]]] = {}
    for i, (s, w) in enumerate(zip(per_row, weights)):
        if s is not None:
            rows, idx, scales = by_group.setdefault(s.group.key, ([], [], []))
            rows.append(i)
            idx.append(s.index)
            scales.append(s.group.scales[s.index] * w)
    out = []
    for key, (rows, idx, scales) in by_group.items():
        device, dtype = key[2], key[1]
        whole, one_scale = len(rows) == len(per_row), len(set(scales)) == 1
        scale = scales[0] if one_scale else torch.tensor(scales, dtype=dtype, device=device)
        if whole and one_scale and len(set(idx)) == 1:
            out.append((key, idx[0], None, scale))
        else:
            out.append((key, torch.tensor(idx, device=device), None if whole else torch.tensor(rows, device=device), scale))
    return out
