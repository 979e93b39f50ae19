"""Per-row slots (S-LoRA's idea): each LoRA layer keeps its adapters in per-rank buffers `Aᵀ (capacity, in, r)` and
`Bᵀ (capacity, r, out)` with room for more, one slot per adapter. Putting an adapter in copies it into a free slot;
deleting it frees the slot; nothing is re-stacked, so a load costs its own size whatever else is loaded. Grouping
by rank means a rank-8 adapter does not pay for a rank-64 one. An inference-only adapter's own tensors become
views of its slot (the contract's `share_row_slot`), so it is held once. Adapters that rescale each output
feature (DoRA) also keep that factor `G` in their slot.

Slots are written under one lock and published only when complete, so forward passes (rows.py, which never
take the lock) may run while other adapters are put in or taken out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .errors import LorakitError

# A rank's buffers start with room for this many adapters and double when full (unless a capacity is given).
FIRST_CAPACITY = 4
# Writers (put in, refresh, free, grow) take this lock; readers (forward passes) never do.
_WRITE = threading.RLock()
# Per adapter name, how many times its slots were published, refreshed or freed in this process (on any layer, any
# model): a kept row plan (rows.RowPlan.stale) compares its adapters' counts, so loading other adapters leaves it be.
_changes: dict[str, int] = {}


def changes(name: str) -> int:
    """How many times `name`'s slots changed so far (published, refreshed, freed)."""
    return _changes.get(name, 0)


def _changed(name: str) -> None:
    _changes[name] = _changes.get(name, 0) + 1


class SlotError(LorakitError, ValueError):
    """An adapter that cannot go into per-row slots (its layer type has no per-row path)."""


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
    writes: list[int] = field(default_factory=list)  # per slot, bumped by each write into it: copies of slots compare it

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
        self.stacked: tuple | None = None  # rows.py: the last few adapters' factors side by side, with their key
        self.prepared: tuple | None = None  # rows.py: the last batch's per-row layout on this layer, with its key

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
                    _changed(name)
                    return old
        return publish_slot(layer, name, stage_slot(layer, adapter, capacity))


def stage_slot(layer, adapter, capacity: int | None = None) -> Slot:
    """Copy `adapter` into a free slot of `layer` (growing its rank's buffers if needed) without publishing it: no
    forward pass reads the slot until publish_slot(). A server does this outside its model lock."""
    if not layer.type.per_row:
        raise SlotError(f"per-row adapters support Linear, GPT-2 Conv1D and Embedding layers, not {type(layer.base_layer).__name__}")
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
        _changed(name)
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
        _changed(name)


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
                     torch.zeros(capacity, dtype=dtype, device=device), [0.0] * capacity, writes=[0] * capacity)


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
    group.writes += [0] * (capacity - len(group.writes))
    for slot in pool.slots.values():  # shared adapters follow their slot into the new buffers
        if slot.group is group and slot.shared:
            slot.adapter.share_row_slot(layer, A[slot.index], B[slot.index])
            slot.version = slot.adapter.row_version()


def _write(group: SlotGroup, i: int, At: torch.Tensor, Bt: torch.Tensor, scale: float, g, layer) -> None:
    group.writes[i] += 1
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
