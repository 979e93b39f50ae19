"""Per-row adapters: one forward pass (or `generate`) in which each row of the batch runs its own adapter, or the base.

Each LoRA layer keeps its adapters stacked into zero-padded tensors, slot 0 being the base (all zeros).
A batch gathers every row's slot and adds `(x · A_row) · B_row` with two batched products (BGMV), so
the cost does not grow with the number of distinct adapters in the batch and switching copies nothing.

    with adapter_rows(model, ["chat", None, "code"]):      # or model(ids, adapter_names=[...])
        logits = model(ids).logits                        # row 1 is the pure base

Inference only: adapter dropout is not applied and no gradient reaches the adapters.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterNotFoundError, LorakitError, MergeStateError
from ..inject import get_state, save_wrappers
from ..layers import MIXED_ROWS, LoraAdapter, LoraLayer, layer_features

RowNames = Sequence[str | None]


class MixedBatchError(LorakitError, ValueError):
    """A per-row adapter batch that cannot be computed: wrong number of names, or an unsupported layer."""


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: RowNames) -> Iterator[nn.Module]:
    """Inside this block, row i of every batch that `model` computes runs adapter `names[i]` (None: the base).

    Applies to the LoRA layers run in this thread (or asyncio task); a batch of k·len(names) rows
    (generate's beams or return sequences) repeats each name k times in a row.
    """
    token = MIXED_ROWS.set(RowPlan(check_names(model, names)))
    try:
        yield model
    finally:
        MIXED_ROWS.reset(token)


def check_names(model: nn.Module, names: RowNames) -> tuple[str | None, ...]:
    """`names` as a tuple, after checking each is None or an adapter `model` holds and can run per row."""
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise MixedBatchError(f"adapter_names must be a non-empty list with one adapter name (or None) per row, got {names!r}")
    state = get_state(model)
    known = list(state.configs) if state else []
    for i, name in enumerate(names):
        if name is None:
            continue
        if not isinstance(name, str):
            raise MixedBatchError(f"adapter_names[{i}] must be an adapter name or None, got {name!r}")
        if name not in known:
            raise AdapterNotFoundError(f"no adapter named {name!r} (row {i}); the model has: {known or 'none'}")
    for name in dict.fromkeys(n for n in names if n is not None):
        if state.configs[name].modules_to_save and any(name in w.modules_to_save for _, w in save_wrappers(model)):
            raise MixedBatchError(
                f"adapter {name!r} trains its own copy of {state.configs[name].modules_to_save}, which one shared "
                "forward cannot switch per row; run its rows in their own batch with lorakit.set_active"
            )
    return tuple(names)


# --- each layer's adapters, stacked -----------------------------------------------------------------


@dataclass(eq=False)
class AdapterStack:
    """One layer's adapters as zero-padded tensors: slot 0 is the base, slot i the i-th adapter."""

    items: tuple[tuple[str, LoraAdapter], ...]  # what it was built from (compared by identity)
    slots: dict[str, int]
    ranks: list[int]  # per slot; 0 for the base
    watch: list[tuple]  # per slot: what changes when that adapter's factors change (see _is_fresh)
    A: torch.Tensor  # (slots, in, r_max): Aᵀ, zero beyond each adapter's rank
    B: torch.Tensor  # (slots, r_max, out): scale · Bᵀ


def _watch(adapter: LoraAdapter) -> tuple:
    # Reads `_parameters` directly: nn.Module.__getattr__ is ~10x slower, and this runs per layer per batch.
    A, B = adapter._parameters["lora_A"], adapter._parameters["lora_B"]
    return adapter, A, B, _version(A), _version(B), A.data_ptr(), B.data_ptr(), adapter.scale


def _is_fresh(watch: tuple) -> bool:
    """The adapter still holds the factors its slot was copied from: same tensors, storage, version and scale."""
    adapter, A, B, version_A, version_B, ptr_A, ptr_B, scale = watch
    p = adapter._parameters
    return (p["lora_A"] is A and p["lora_B"] is B and _version(A) == version_A and _version(B) == version_B
            and A.data_ptr() == ptr_A and B.data_ptr() == ptr_B and adapter.scale == scale)


def _version(t: torch.Tensor) -> int:
    # In-place writes (a load's copy, a training step) bump it. Inference tensors have none: always rebuild.
    return t._version if not t.is_inference() else -id(t)


def layer_stack(layer: LoraLayer, used: set[str] | None = None) -> AdapterStack | None:
    """`layer`'s cached stack, rebuilt when its adapters were added or deleted, or when one of the adapters
    in `used` (all if None) was changed in place since it was built. None when the layer holds no adapter."""
    # One C-level copy: a store may add or delete adapters from another thread while this runs.
    items = tuple(layer.adapters._modules.items())
    if not items:
        return None
    stack = layer.mixed_stack
    if stack is not None and stack.items == items:
        if all(_is_fresh(stack.watch[s]) for s, (name, _) in enumerate(items, 1) if used is None or name in used):
            return stack
    stack = _build_stack(layer, items)
    layer.mixed_stack = stack
    return stack


def _build_stack(layer: LoraLayer, items: tuple[tuple[str, LoraAdapter], ...]) -> AdapterStack:
    if layer.kind == "conv2d":
        raise MixedBatchError("per-row adapters support Linear, GPT-2 Conv1D and Embedding layers, not Conv2d")
    watch = [()] + [_watch(a) for _, a in items]  # before reading the data: a racing write shows up later
    in_f, out_f = layer_features(layer.base_layer, layer.kind)
    ranks = [0] + [a.lora_A.shape[0] for _, a in items]
    dtype = functools.reduce(torch.promote_types, [a.lora_A.dtype for _, a in items])
    device = items[0][1].lora_A.device
    # Normal tensors even when called under inference_mode, so a later forward with gradients can read them.
    with torch.inference_mode(False), torch.no_grad():
        A = torch.zeros(len(items) + 1, in_f, max(ranks), dtype=dtype, device=device)
        B = torch.zeros(len(items) + 1, max(ranks), out_f, dtype=dtype, device=device)
        for s, (_, a) in enumerate(items, 1):
            A[s, :, : ranks[s]] = a.lora_A.T
            B[s, : ranks[s]] = a.lora_B.T * a.scale
    slots = {name: s for s, (name, _) in enumerate(items, 1)}
    return AdapterStack(items, slots, ranks, watch, A, B)


def clear_stacks(model: nn.Module) -> None:
    """Drop every layer's cached stack (they are rebuilt on the next per-row batch); frees their memory."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.mixed_stack = None


# --- the per-row forward ----------------------------------------------------------------------------


class RowPlan:
    """The adapter of every row, resolved once per layer into that layer's stack slots (an int when all
    rows share one slot, else a tensor of slots). One plan lives as long as one `adapter_rows` block."""

    def __init__(self, names: tuple[str | None, ...]):
        self.names = names
        self.distinct = {n for n in names if n is not None}
        self._layers: dict[int, tuple[LoraLayer, AdapterStack | None, int | torch.Tensor]] = {}
        self._cache: dict[tuple, object] = {}  # slot tensors and indices shared by layers with the same adapters

    def forward(self, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        entry = self._layers.get(id(layer))
        if entry is None or entry[0] is not layer:
            entry = self._layers[id(layer)] = self._prepare(layer)
        _, stack, slots = entry
        y = layer.base_layer(x)
        if isinstance(slots, int):
            return y if slots == 0 else _add_one(layer.kind, stack, slots, x, y)
        rows = self._cached(("rows", id(slots), x.shape[0] if x.dim() else 0), lambda: _expand(slots, x, layer.kind))
        if layer.kind == "embedding":
            return _add_embedding_rows(stack, rows, x, y)
        x3 = x.reshape(rows.shape[0], -1, x.shape[-1])
        if x3.shape[1] > FEW_TOKENS:
            return _add_rows(stack, rows, x3, y)
        in_f, r = stack.A.shape[1:]
        index = self._cached(("bags", id(rows), x3.shape[1], in_f, r), lambda: _bag_index(rows, x3.shape[1], in_f, r))
        return _add_rows_in_place(stack, index, x3, y)

    def _prepare(self, layer: LoraLayer):
        if layer.merged:
            raise MergeStateError("the model has merged adapters; call lorakit.unmerge(model) before running per-row adapters")
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


# Up to this many tokens per row (decoding), each row's factors are read in place by embedding_bag; beyond,
# gathering them once per row and running batched matrix products is faster (measured on CPU: crossover ~8-16).
FEW_TOKENS = 8


def _expand(slots: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The slot of each of x's rows (its first dimension)."""
    rows = x.shape[0] if x.dim() >= (1 if kind == "embedding" else 2) else 0
    if rows == len(slots):
        return slots
    if rows and rows % len(slots) == 0:  # generate() repeats each row in place for beams / num_return_sequences
        return slots.repeat_interleave(rows // len(slots))
    raise MixedBatchError(
        f"a LoRA layer got an input of shape {tuple(x.shape)}, whose first dimension does not fit the "
        f"{len(slots)} adapter names given; pass one name (or None) per row of the batch"
    )


def _add_one(kind: str, stack: AdapterStack, s: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every row runs slot `s`: plain matrix products, at the adapter's own rank."""
    r = stack.ranks[s]
    A, B = stack.A[s, :, :r], stack.B[s, :r]
    t = F.embedding(x, A) if kind == "embedding" else x.to(A.dtype) @ A
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


# --- the adapter_names= keyword on the model ----------------------------------------------------------


class AdapterNamesKeyword:
    """Stands in for `model.forward` or `model.generate`: adds `adapter_names=[...]` and otherwise calls
    what it replaced. An object, not a closure, so deepcopy and pickle carry it to the copied model."""

    def __init__(self, model: nn.Module, attr: str, inner=None):
        self.model, self.attr = model, attr
        self.inner = inner  # an instance-level forward that was there before (e.g. accelerate's hook), else None
        self._signature = None

    def _target(self):
        return self.inner if self.inner is not None else getattr(type(self.model), self.attr).__get__(self.model)

    def __call__(self, *args, adapter_names: RowNames | None = None, **kwargs):
        fn = self._target()
        if adapter_names is None:
            return fn(*args, **kwargs)
        names = check_names(self.model, adapter_names)
        rows = _batch_rows(args, kwargs)
        if rows is not None and rows != len(names):
            raise MixedBatchError(f"adapter_names has {len(names)} names for a batch of {rows} rows; pass one per row")
        with adapter_rows(self.model, names):
            return fn(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """The replaced method's signature plus `adapter_names` (transformers reads forward's parameters)."""
        if self._signature is None:
            sig = inspect.signature(self._target())
            params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
            params.append(inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
            params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
            self._signature = sig.replace(parameters=params)
        return self._signature

    def __getstate__(self) -> dict:  # deepcopy / pickle: the signature is recomputed on demand
        return {**self.__dict__, "_signature": None}

    def __repr__(self) -> str:
        return f"<{self.attr} of {type(self.model).__name__} with adapter_names=>"


def install_adapter_names(model: nn.Module) -> None:
    """Give `model.forward` (and `model.generate`, if it has one) the `adapter_names=` keyword. Idempotent."""
    for attr in ("forward", "generate"):
        current = model.__dict__.get(attr)
        if isinstance(current, AdapterNamesKeyword) or not callable(getattr(model, attr, None)):
            continue
        model.__dict__[attr] = AdapterNamesKeyword(model, attr, current)


def uninstall_adapter_names(model: nn.Module) -> None:
    """Put back what `install_adapter_names` replaced (e.g. after `lorakit.unload`)."""
    for attr in ("forward", "generate"):
        current = model.__dict__.get(attr)
        if isinstance(current, AdapterNamesKeyword):
            if current.inner is None:
                del model.__dict__[attr]
            else:
                model.__dict__[attr] = current.inner


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    for value in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    return None
