"""The products of the per-row forward (rows.py plans which one each layer runs): each row's
`scale · (x · A_row) · B_row` added into the base output, for rows grouped by adapter (in place), for few-token rows
with all adapters side by side, and with each row's slot gathered (BGMV), plus DoRA's per-feature rescale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .slots import SlotGroup

# Up to this many tokens per row (decoding), each row's factors are read in place by embedding_bag; beyond,
# gathering them once per row and running batched matrix products is faster (measured on CPU: crossover ~8-16).
FEW_TOKENS = 8


def add_runs(y: torch.Tensor, x: torch.Tensor, n: int, runs: tuple, repeats: int) -> torch.Tensor:
    """y + `scale · (x · Aᵀ) · Bᵀ` of each run's slot on the run's rows, in place (no graph recorded, y contiguous and
    in the factors' dtype: the caller checks)."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    per_row = x2.shape[0] // n * repeats  # token rows per name
    if x2.dtype != y2.dtype:
        x2 = x2.to(y2.dtype)
    for start, end, slot in runs:
        group, i = slot.group, slot.index
        a, b = start * per_row, end * per_row
        y2[a:b].addmm_(x2[a:b] @ group.A[i], group.B[i], alpha=group.scales[i])
    return y


def add_stacked(layer, y: torch.Tensor, x: torch.Tensor, n: int, order: tuple, mask: torch.Tensor) -> torch.Tensor:
    """y + each row's `scale · (x · Aᵀ) · Bᵀ` for few-token rows: every adapter of the batch side by side, each row
    keeping its own adapter's columns (rows.STACK_MAX_RANK)."""
    A, B = stacked_factors(layer, order)
    t = x.reshape(n, -1, x.shape[-1]).to(A.dtype) @ A
    t = t.mul_(mask.view(n, 1, -1)).view(-1, A.shape[1])
    return add(y, t, B, x)


def stacked_factors(layer, order: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(in, total rank) and (total rank, out): the slots' Aᵀ and Bᵀ side by side. The layer keeps the last such copy
    (at most rows.STACK_MAX_RANK ranks' worth of factors): consecutive decode steps mostly run the same adapters, and
    the copy costs more than the products it serves. Any write into one of its slots makes a new one."""
    if len(order) == 1:
        return order[0].group.A[order[0].index], order[0].group.B[order[0].index]
    pool = layer.row_slots
    key = tuple((id(s.group), s.index, s.group.writes[s.index]) for s in order)
    stacked = pool.stacked
    if stacked is not None and stacked[0] == key:
        return stacked[1], stacked[2]
    A = torch.cat([s.group.A[s.index] for s in order], 1)
    B = torch.cat([s.group.B[s.index] for s in order], 0)
    pool.stacked = (key, A, B)
    return A, B


def add_into_rows(y: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    if torch.is_grad_enabled():
        return y.index_add(0, rows, delta, alpha=alpha)
    return y.index_add_(0, rows, delta, alpha=alpha)


def row_scales(group: SlotGroup, slots: torch.Tensor, scale) -> torch.Tensor:
    """Each row's scale when its rows do not share one: its slot's, or a mix's (slot scale × weight, precomputed)."""
    return group.scale[slots] if scale is None else scale


def add_slots(layer, group: SlotGroup, slots, x: torch.Tensor, y: torch.Tensor | None, plan,
               scale) -> torch.Tensor:
    """y + each row's `scale · (x · Aᵀ[slot]) · Bᵀ[slot]` for rows whose adapters all sit in `group` (in place into y
    when no graph is recorded). `scale`: the one scale of all these rows (a float), None to read each row's from
    its slot, or a tensor with each row's. With y None, the delta alone, shaped like x with the output's width (not
    multiplied by a common float `scale`: the caller does)."""
    if isinstance(slots, int):
        return add_one(layer, group, slots, x, y, scale)
    if layer.type.takes_ids:
        return add_embedding_rows(group, slots, x, y, scale)
    x3 = x.reshape(slots.shape[0], -1, x.shape[-1])
    if x3.shape[1] > FEW_TOKENS:
        return add_rows(group, slots, x3, y, scale)
    in_f, r = group.A.shape[1:]
    index = plan._cached(("bags", id(slots), x3.shape[1], in_f, r), lambda: bag_index(slots, x3.shape[1], in_f, r))
    return add_rows_in_place(group, slots, index, x3, y, scale)


def column_factors(scaled: list[tuple], y: torch.Tensor, n: int) -> torch.Tensor:
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


def rescale(layer, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`g ⊙ (y − bias) + bias`: DoRA's per-feature factor applies to the weight's product, not to the bias."""
    bias = layer.bias
    if bias is None:
        return y * g.to(y.dtype)
    return torch.addcmul(bias, y - bias, g.to(y.dtype))


def add_one(layer, group: SlotGroup, s: int, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """Every row runs slot `s` at one `scale` (its own, or a mix's weight times it): plain matrix products, at the
    adapter's own rank."""
    A, B = group.A[s], group.B[s]
    r = A.shape[1]
    t = F.embedding(x, A) if layer.type.takes_ids else x.to(A.dtype) @ A
    return add(y, t.reshape(-1, r), B, x, scale)


def add_rows(group: SlotGroup, slots: torch.Tensor, x3: torch.Tensor, y: torch.Tensor | None,
              scale) -> torch.Tensor:
    """Row i adds `scale_i · (x_i · A[slot_i]) · B[slot_i]`: gather each row's factors, two batched products (BGMV);
    the scale multiplies the r-wide product, the cheapest place for it."""
    t = torch.bmm(x3.to(group.A.dtype), group.A[slots])
    if type(scale) is not float:
        t.mul_(row_scales(group, slots, scale).view(-1, 1, 1))
    return add(y, t, group.B[slots], x3, scale if type(scale) is float else 1.0)


def add_rows_in_place(group: SlotGroup, slots: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor],
                       x3: torch.Tensor, y: torch.Tensor | None, scale) -> torch.Tensor:
    """The same sum for few tokens per row, without copying any factor: token j of row i is a bag of the
    rows `slot_i·in + k` of A (viewed as (slots·in, r)) weighted by x_ijk; then likewise through B."""
    index_A, index_B = index
    A, B = group.A.view(-1, group.A.shape[-1]), group.B.view(-1, group.B.shape[-1])
    t = F.embedding_bag(index_A, A, per_sample_weights=x3.reshape(-1, x3.shape[-1]).to(A.dtype), mode="sum")
    if type(scale) is not float:
        t = t.view(x3.shape[0], x3.shape[1], -1).mul_(row_scales(group, slots, scale).view(-1, 1, 1)).view(-1, t.shape[-1])
    delta = F.embedding_bag(index_B, B, per_sample_weights=t, mode="sum")
    if y is None:
        return delta.view(*x3.shape[:-1], -1)
    delta, alpha = delta.view(y.shape), scale if type(scale) is float else 1.0
    if y.dtype == delta.dtype and not torch.is_grad_enabled():
        return y.add_(delta, alpha=alpha)
    return y + alpha * delta.to(y.dtype)


def bag_index(slots: torch.Tensor, tokens: int, in_f: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (rows × tokens), the rows of the flattened A and B its row's slot owns."""
    index_A = (slots[:, None] * in_f + torch.arange(in_f, device=slots.device)).repeat_interleave(tokens, 0)
    index_B = (slots[:, None] * r + torch.arange(r, device=slots.device)).repeat_interleave(tokens, 0)
    return index_A, index_B


def add_embedding_rows(group: SlotGroup, slots: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None,
                        scale) -> torch.Tensor:
    n = slots.shape[0]
    t = group.A[slots.view(-1, *[1] * (x.dim() - 1)), x]  # (n, ..., r): each token's row of its adapter's Aᵀ
    t = t.reshape(n, -1, t.shape[-1])
    if type(scale) is not float:
        t = t * row_scales(group, slots, scale).view(-1, 1, 1)
    return add(y, t, group.B[slots], x, scale if type(scale) is float else 1.0)


def add(y: torch.Tensor | None, t: torch.Tensor, B: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
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
