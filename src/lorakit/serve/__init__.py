"""Serving many adapters on one base: per-row adapter batches (mixed.py), an adapter cache (store.py), HTTP."""

from .mixed import MixedBatchError, adapter_rows
from .store import AdapterInUseError, AdapterPathError, AdapterStore, StoreFullError, StoreStats

__all__ = ["adapter_rows", "MixedBatchError", "AdapterStore", "StoreStats", "AdapterPathError", "AdapterInUseError",
           "StoreFullError"]
