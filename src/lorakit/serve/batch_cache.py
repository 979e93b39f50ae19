"""The running rows' keys and values: one transformers cache whose rows are left-padded to a common length."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BatchCache:
    """The running rows' keys/values: one transformers cache whose rows are left-padded to a common length,
    and a mask (rows, T) with 1 for real tokens. Decode steps append to it in place; it is only copied
    when rows join or leave."""

    def __init__(self):
        self.cache = None
        self.mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, cache, mask: torch.Tensor | None = None) -> None:
        """Append the rows of another cache (a prefill's), whose `mask` (rows, n) marks its real tokens (default:
        one row, all real), padding on the left to a common length."""
        n = cache.get_seq_length()
        if mask is None:
            mask = torch.ones(1, n, dtype=torch.long, device=cache.layers[0].keys.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        T = max(self.length, n)
        for layer, row in zip(self.cache.layers, cache.layers):
            layer.keys = torch.cat([_pad_left(layer.keys, T), _pad_left(row.keys, T)])
            layer.values = torch.cat([_pad_left(layer.values, T), _pad_left(row.values, T)])
        self.mask = torch.cat([F.pad(self.mask, (T - self.length, 0)), F.pad(mask, (T - n, 0))])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, then drop leading columns that are padding in every row left."""
        if not rows:
            self.cache = self.mask = None
            return
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[idx]
        start = int(mask.any(0).int().argmax())
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, start:], layer.values[idx, :, start:]

    def grow(self) -> torch.Tensor:
        """The mask for a decode step that appends one real token to every row (the cache appends itself)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, 0, length - t.shape[-2], 0))


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()  # DynamicLayers only: full attention (sliding-window layers are not special-cased)
