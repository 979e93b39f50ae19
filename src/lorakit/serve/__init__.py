"""Serving many adapters on one base: an adapter cache (store.py), a continuous-batching engine, HTTP.

Per-row adapter batches are core behaviour (lorakit.rows, entered through lorakit.adapter_rows); they are
re-exported here for code written against the serving package.
"""

from ..adapters import adapter_rows
from ..rows import MixedBatchError
from .store import AdapterInUseError, AdapterPathError, AdapterStore, StoreFullError, StoreStats

__all__ = ["adapter_rows", "MixedBatchError", "AdapterStore", "StoreStats", "AdapterPathError", "AdapterInUseError",
           "StoreFullError"]
