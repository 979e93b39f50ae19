"""Per-row adapters: one forward pass in which each row of the batch runs its own adapter, or the base.

Each LoRA layer keeps its adapters in slots (S-LoRA's idea): per rank, stacked buffers `Aᵀ (capacity, in, r)`
and `Bᵀ (capacity, r, out)` with room for more, one slot per adapter. Putting an adapter in copies it into
a free slot; deleting it frees the slot; nothing is re-stacked, so a load costs its own size whatever else is
loaded. Grouping by rank means a rank-8 adapter does not pay for a rank-64 one. An inference-only adapter's
own tensors become views of its slot (the contract's `share_row_slot`), so it is held once.

A batch gathers every row's slot and adds `scale · (x · A_row) · B_row` with two batched products (BGMV) per
rank present, so the cost does not grow with the number of distinct adapters in the batch and switching
copies nothing. Adapters that rescale each output feature (DoRA) also keep that factor `G` in their slot.

This module is the math and the per-thread plan; `lorakit.adapters.adapter_rows(model, names)` is the entry point.
Inference only: adapter dropout is not applied and no gradient reaches the adapters. Slots are written under
one lock and published only when complete, so a forward may run while other adapters are put in or taken out.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field
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
# A rank's buffers start with room for this many adapters and double when full (unless a capacity is given).
FIRST_CAPACITY = 4
# Writers (put in, refresh, free, grow) take this lock; readers (forward passes) never do.
_WRITE = threading.RLock()


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


# --- each layer's slots ---------------------------------------------------------------------------


@dataclass(eq=False)
class SlotGroup:
    """The slots of one rank (and dtype, device) on one layer. Only slots handed out are ever read."""

    key: tuple  # (rank, dtype, device)
    A: torch.Tensor  # (capacity, in, r): Aᵀ
    B: torch.Tensor  # (capacity, r, out): Bᵀ, unscaled (so a plain adapter's B can be a view of it)
    scale: torch.Tensor  # (capacity,)
    scales: list[float]  # the same as Python floats, for the one-slot path
    G: torch.Tensor | None = None  # (capacity, out): per-feature factor (DoRA), 1 for others; made on first need
    free: list[int] = field(default_factory=list)
    used: int = 0  # slots handed out so far (the high-water mark)

    @property
    def capacity(self) -> int:
        return self.A.shape[0]


@dataclass(eq=False)
class Slot:
    group: SlotGroup
    index: int
    adapter: object  # the adapter object it holds (compared by identity)
    version: tuple  # the adapter's row_version() when it was copied
    shared: bool  # the adapter's own tensors are views of this slot


class SlotPool:
    """One layer's slots: {rank key: SlotGroup} and {adapter name: Slot}. `capacity`: the room each rank's
    buffers get at once (e.g. a server's cap on loaded adapters); None grows them by doubling."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.groups: dict[tuple, SlotGroup] = {}
        self.slots: dict[str, Slot] = {}

    def __deepcopy__(self, memo) -> "SlotPool":
        # A copied model's adapters own copies of their tensors; they are put in fresh slots on first use.
        return SlotPool(self.capacity)

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity, "groups": {}, "slots": {}}

    def nbytes(self) -> int:
        """Bytes of the slots handed out (what loaded adapters hold; unused capacity is never touched)."""
        total = 0
        for g in self.groups.values():
            per_slot = (g.A[0].numel() + g.B[0].numel() + 1 + (g.G[0].numel() if g.G is not None else 0)) * g.A.element_size()
            total += per_slot * (g.used - len(g.free))
        return total


def slot_pool(layer) -> SlotPool:
    pool = layer.row_slots
    if pool is None:
        with _WRITE:
            if layer.row_slots is None:
                layer.row_slots = SlotPool()
            pool = layer.row_slots
    return pool


def put_in_slot(layer, name: str, adapter, capacity: int | None = None) -> Slot:
    """Copy `adapter` (named `name` on `layer`) into a slot, reusing its slot when it has one; costs its own size.
    `capacity` fixes the room of a rank's buffers when they are first made."""
    with _WRITE:
        old = layer.row_slots.slots.get(name) if layer.row_slots is not None else None
        if old is not None and old.adapter is adapter:
            with torch.inference_mode(False), torch.no_grad():
                At, Bt, scale = _row_factors(adapter, layer)
                if old.group.key == _group_key(At, Bt):  # refresh in place (a training step, new weights)
                    _write(old.group, old.index, At, Bt, scale, adapter.row_column_scale(layer), layer)
                    old.version = adapter.row_version()
                    return old
        return publish_slot(layer, name, stage_slot(layer, adapter, capacity))


def stage_slot(layer, adapter, capacity: int | None = None) -> Slot:
    """Copy `adapter` into a free slot of `layer` (growing its rank's buffers if needed) without publishing it: no
    forward pass reads the slot until publish_slot(). A server does this outside its model lock."""
    if not layer.type.per_row:
        raise MixedBatchError(f"per-row adapters support Linear, GPT-2 Conv1D and Embedding layers, not {type(layer.base_layer).__name__}")
    pool = slot_pool(layer)
    with _WRITE, torch.inference_mode(False), torch.no_grad():
        if capacity is not None and pool.capacity is None:
            pool.capacity = capacity
        At, Bt, scale = _row_factors(adapter, layer)
        key = _group_key(At, Bt)
        group = pool.groups.get(key)
        if group is None:
            group = pool.groups[key] = _new_group(key, layer, pool.capacity or FIRST_CAPACITY)
        index = _take(layer, pool, group)
        _write(group, index, At, Bt, scale, adapter.row_column_scale(layer), layer)
        return Slot(group, index, adapter, (), False)


def publish_slot(layer, name: str, slot: Slot) -> Slot:
    """Make a staged slot `name`'s on `layer` (its previous slot, if any, is freed); an inference-only adapter's
    tensors become views of it. Cheap: no copy."""
    pool = slot_pool(layer)
    with _WRITE, torch.no_grad():
        if name in pool.slots:
            free_slot(layer, name)
        adapter = slot.adapter
        slot.shared = (not any(p.requires_grad for p in adapter.parameters())
                       and adapter.share_row_slot(layer, slot.group.A[slot.index], slot.group.B[slot.index]))
        slot.version = adapter.row_version()  # after sharing: its pointers moved
        pool.slots[name] = slot  # published: forward passes may use it from here on
        return slot


def unstage_slot(slot: Slot) -> None:
    """Give back a staged slot that will not be published (a load that failed)."""
    with _WRITE:
        slot.group.free.append(slot.index)


def free_slot(layer, name: str) -> None:
    """Take `name` out of `layer`'s slots; its adapter keeps (a copy of) its own tensors."""
    pool = layer.row_slots
    if pool is None:
        return
    with _WRITE, torch.no_grad():
        slot = pool.slots.pop(name, None)
        if slot is None:
            return
        if slot.shared:  # whoever still holds the adapter object keeps valid tensors after the slot is reused
            storages = {slot.group.A.untyped_storage().data_ptr(), slot.group.B.untyped_storage().data_ptr()}
            for p in slot.adapter.parameters():
                if p.untyped_storage().data_ptr() in storages:
                    p.data = p.data.clone()
        slot.group.free.append(slot.index)


def current_slot(layer, name: str, adapter) -> Slot:
    """`name`'s slot on `layer`, put in (or refreshed) first when missing or when the adapter changed since."""
    pool = layer.row_slots
    slot = pool.slots.get(name) if pool is not None else None
    if slot is not None and slot.adapter is adapter and slot.version == adapter.row_version():
        return slot
    with _WRITE:  # another thread may have done it meanwhile
        slot = layer.row_slots.slots.get(name) if layer.row_slots is not None else None
        if slot is not None and slot.adapter is adapter and slot.version == adapter.row_version():
            return slot
        return put_in_slot(layer, name, adapter)


def clear_slots(model) -> None:
    """Take every adapter out of every layer's slots and drop the buffers (each adapter keeps its own tensors)."""
    for module in model.modules():
        pool = getattr(module, "row_slots", None)
        if pool is not None:
            for name in list(pool.slots):
                free_slot(module, name)
            module.row_slots = None


def _row_factors(adapter, layer) -> tuple[torch.Tensor, torch.Tensor, float]:
    factors = adapter.row_factors(layer)
    if len(factors) == 2:  # an adapter that folds its scale into Bᵀ
        return factors[0], factors[1], 1.0
    return factors


def _group_key(At: torch.Tensor, Bt: torch.Tensor) -> tuple:
    return At.shape[1], torch.promote_types(At.dtype, Bt.dtype), At.device


def _new_group(key: tuple, layer, capacity: int) -> SlotGroup:
    r, dtype, device = key
    in_f, out_f = layer.features
    # torch.empty: pages of capacity not handed out yet are never touched, so they take no memory.
    return SlotGroup(key, torch.empty(capacity, in_f, r, dtype=dtype, device=device),
                     torch.empty(capacity, r, out_f, dtype=dtype, device=device),
                     torch.zeros(capacity, dtype=dtype, device=device), [0.0] * capacity)


def _take(layer, pool: SlotPool, group: SlotGroup) -> int:
    if group.free:
        return group.free.pop()
    if group.used == group.capacity:
        _grow(layer, pool, group)
    group.used += 1
    return group.used - 1


def _grow(layer, pool: SlotPool, group: SlotGroup) -> None:
    """Double the buffers: a copy of what is there (amortised: each slot is copied O(1) times on average). The
    new buffers are complete before they replace the old ones, which running forward passes may still read."""
    n, capacity = group.used, group.capacity * 2
    A = torch.empty(capacity, *group.A.shape[1:], dtype=group.A.dtype, device=group.A.device)
    B = torch.empty(capacity, *group.B.shape[1:], dtype=group.B.dtype, device=group.B.device)
    A[:n].copy_(group.A[:n])
    B[:n].copy_(group.B[:n])
    scale = torch.zeros(capacity, dtype=group.scale.dtype, device=group.scale.device)
    scale[:n] = group.scale[:n]
    G = None
    if group.G is not None:
        G = torch.empty(capacity, group.G.shape[1], dtype=group.G.dtype, device=group.G.device)
        G[:n] = group.G[:n]
    group.A, group.B, group.scale, group.G = A, B, scale, G
    group.scales += [0.0] * (capacity - len(group.scales))
    for slot in pool.slots.values():  # shared adapters follow their slot into the new buffers
        if slot.group is group and slot.shared:
            slot.adapter.share_row_slot(layer, A[slot.index], B[slot.index])
            slot.version = slot.adapter.row_version()


def _write(group: SlotGroup, i: int, At: torch.Tensor, Bt: torch.Tensor, scale: float, g, layer) -> None:
    if At.data_ptr() != group.A[i].data_ptr():  # a shared adapter's refresh: already in place
        group.A[i].copy_(At)
    if Bt.data_ptr() != group.B[i].data_ptr():
        group.B[i].copy_(Bt)
    group.scale[i] = scale
    group.scales[i] = float(scale)
    if g is not None and group.G is None:  # the first DoRA-like adapter of this rank: the others' factor is 1
        group.G = torch.empty(group.capacity, layer.features[1], dtype=group.A.dtype, device=group.A.device)
        group.G[: group.used].fill_(1.0)
    if group.G is not None:
        if g is None:
            group.G[i].fill_(1.0)
        else:
            group.G[i].copy_(g)


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
