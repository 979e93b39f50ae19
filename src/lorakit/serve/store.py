"""Adapters by name for a server: registered directories, loaded onto the shared base on first use, kept in an
LRU cache under a cap on their number and bytes, and pinned by the requests that use them.

Every load goes into a fresh adapter under a new name on the model, published only once complete; a
pinned adapter is never evicted; the cache lock is held for bookkeeping only, never across a load or an
eviction, so requests for adapters already loaded never wait for one. A load reads and checks its files
without the model lock, builds the adapter and copies it into free per-row slots (lorakit.rows) without it too;
only attaching it and publishing its slots (no copy) take the lock. A load costs the adapter's own size however
many are loaded, and forward passes run meanwhile.

A saved mixture of LoRAs (lorakit.save_mixture's directory) is one name too: its experts are loaded with it as
internal adapters named `<its model name>/<expert>` (no registered name can be one), counted in its bytes and
deleted with it; its rows run per row beside the others (rows.py's fallback for adapters without slots).

Which directories may be served, and their files' checks, are adapter_dirs.py's.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..adapters import active_adapters, adapter_rows, delete_adapter, is_merged, set_active
from ..compose.mixture import MixtureFiles, commit_mixture, discard_mixture, prepare_mixture
from ..errors import (
    AdapterExistsError,
    AdapterFileNotFoundError,
    AdapterNotFoundError,
    ConfigError,
    LorakitError,
    MergeStateError,
)
from ..io import AdapterFiles, commit_adapter, discard_adapter, prepare_adapter, read_adapter_tensors
from ..matching import logical_modules
from ..state import adapter_layers
from .adapter_dirs import AdapterPathError, registry_entries, resolve_in_root, servable_files

# AdapterPathError is raised by adapter_dirs.py's checks; it is still importable from here, where it was defined.
__all__ = ["AdapterStore", "StoreStats", "AdapterInUseError", "StoreFullError", "AdapterPathError"]


class AdapterInUseError(LorakitError, RuntimeError):
    """Unregistering an adapter that running requests still use."""


class StoreFullError(LorakitError, RuntimeError):
    """No room to load an adapter: every loaded adapter is in use. Retry when requests finish."""


@dataclass
class StoreStats:
    hits: int = 0  # acquire() of an adapter already loaded
    loads: int = 0
    failed_loads: int = 0
    evictions: int = 0
    loaded: int = 0
    loaded_bytes: int = 0


@dataclass(eq=False)
class _Entry:
    name: str
    path: Path
    nbytes: int  # its tensors' bytes on the model (estimated from the file until loaded)
    model_name: str | None = None  # its name on the model, set once it is fully loaded
    parts: list[str] = field(default_factory=list)  # a mixture's experts' names on the model, loaded and deleted with it
    pins: int = 0
    loading: "_Loading | None" = None


@dataclass(eq=False)
class _Loading:
    """A load in progress: other requests for the same adapter wait on it instead of loading it twice."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class AdapterStore:
    """Named adapters on one shared `model`, loaded on demand (LRU, at most `max_loaded` of them and `max_bytes`).

    `root`: when set, every adapter path must lie inside it (relative paths are taken from it).
    `model_lock`: held while the model is changed (load, evict); pass the lock your forward passes hold if
    they must not overlap a change; by default only loads and evictions exclude each other.
    """

    def __init__(self, model: nn.Module, root: str | Path | None = None, max_loaded: int | None = None,
                 max_bytes: int | None = None, model_lock=None):
        for key, value in (("max_loaded", max_loaded), ("max_bytes", max_bytes)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key} must be a positive integer or None (no cap), got {value!r}")
        self.model, self.max_loaded, self.max_bytes = model, max_loaded, max_bytes
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise AdapterFileNotFoundError(f"adapter root {str(root)!r} is not a directory")
        self.model_lock = model_lock if model_lock is not None else threading.RLock()
        with self.model_lock:  # the module tree by logical name: what adapter files are checked against, lock-free
            self._modules = dict(logical_modules(model))
        self.broken: dict[str, str] = {}  # name -> why it was skipped (register_root)
        self._lock = threading.Lock()  # guards the fields below; never held across a load or an eviction
        self._entries: dict[str, _Entry] = {}
        self._by_model_name: dict[str, _Entry] = {}
        self._lru: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # loaded or loading, oldest first
        self._used_bytes = 0  # of the entries in _lru
        self._ids = itertools.count(1)
        self._stats = StoreStats()

    # -- registry --

    def register(self, name: str, path: str | Path) -> bool:
        """Make the adapter (or saved mixture) at `path` available as `name` (loaded on first use). Checks now that
        the path is inside the root and that the files are a LoRA adapter (or a mixture of them) that fits this base.
        Returns False when `name` is already registered for the same directory."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"adapter names must be non-empty strings, got {name!r}")
        resolved = self._resolve(path)
        with self._lock:
            known = self._entries.get(name)
        if known is not None:
            if known.path == resolved:
                return False
            raise AdapterExistsError(f"adapter {name!r} is already registered for {known.path}; unregister it first")
        nbytes = self._check_adapter(resolved)
        with self._lock:
            if name in self._entries:  # registered meanwhile by another thread
                if self._entries[name].path == resolved:
                    return False
                raise AdapterExistsError(f"adapter {name!r} is already registered for {self._entries[name].path}")
            self._entries[name] = _Entry(name, resolved, nbytes)
        return True

    def register_root(self, root: str | Path | None = None) -> dict[str, str]:
        """Register every adapter directory and saved mixture under `root` (default: the store's root) by its relative
        path, e.g. `team/chat` (a mixture's own experts are part of it, not registered apart). Broken ones are skipped
        and returned (also kept in `self.broken`) as {name: reason}: one bad directory among thousands must not keep
        the others from serving."""
        root = Path(root) if root is not None else self.root
        if root is None:
            raise ConfigError("register_root() needs a root directory (or a store made with root=...)")
        broken: dict[str, str] = {}
        for name, directory in registry_entries(root).items():
            try:
                self.register(name, directory)
            except (LorakitError, OSError) as e:
                broken[name] = f"{type(e).__name__}: {e}"
        self.broken.update(broken)
        return broken

    def unregister(self, name: str) -> None:
        """Forget `name` and remove it from the model. Refused while a request uses it."""
        with self._lock:
            entry = self._entry(name)
            if entry.pins:
                raise AdapterInUseError(f"adapter {name!r} is in use by {entry.pins} running request(s); retry when they finish")
            del self._entries[name]
            victims = self._forget(entry) if name in self._lru else []
        self._delete_from_model(victims)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def loaded(self) -> list[str]:
        """Names of the adapters on the model now, least recently used first."""
        with self._lock:
            return [name for name, e in self._lru.items() if e.model_name is not None]

    def path(self, name: str) -> Path:
        with self._lock:
            return self._entry(name).path

    def stats(self) -> StoreStats:
        with self._lock:
            loaded = [e for e in self._lru.values() if e.model_name is not None]
            return StoreStats(**{**self._stats.__dict__, "loaded": len(loaded), "loaded_bytes": sum(e.nbytes for e in loaded)})

    # -- use --

    def acquire(self, name: str) -> str:
        """Pin adapter `name` (loading it if needed) and return its name on the model, for `adapter_names`.
        Every acquire() needs one release()."""
        entry, loading, starts = self._pin(name)
        try:
            if starts:
                self._load(entry, loading)
            elif loading is not None:
                loading.done.wait()
                if loading.error is not None:
                    raise loading.error
        except BaseException:
            self._unpin(entry)
            raise
        return entry.model_name

    def release(self, name: str) -> None:
        """Unpin an adapter acquired before; `name` is its store name or the model name acquire() returned."""
        with self._lock:
            entry = self._entries.get(name) or self._by_model_name.get(name)
            if entry is None or entry.pins == 0:
                raise LorakitError(f"release({name!r}) without a matching acquire()")
            entry.pins -= 1

    @contextlib.contextmanager
    def pinned(self, names: Sequence[str | None]) -> Iterator[list[str | None]]:
        """Pin every named adapter for the block; yields the names to pass as `adapter_names` (None stays None)."""
        model_names: dict[str, str] = {}
        try:
            for name in dict.fromkeys(n for n in names if n is not None):
                model_names[name] = self.acquire(name)
            yield [None if n is None else model_names[n] for n in names]
        finally:
            for name in model_names:
                self.release(name)

    @contextlib.contextmanager
    def rows(self, names: Sequence[str | None]) -> Iterator[nn.Module]:
        """Pin the adapters and run per-row adapters: inside, `model(ids)` / `model.generate(ids)` use names[i] for row i."""
        with self.pinned(names) as model_names, adapter_rows(self.model, model_names):
            yield self.model

    def prefetch(self, name: str) -> threading.Thread:
        """Load `name` in a background thread (errors show up at the next acquire())."""

        def run():
            with contextlib.suppress(LorakitError, OSError):
                self.release(self.acquire(name))

        thread = threading.Thread(target=run, name=f"lorakit-prefetch-{name}", daemon=True)
        thread.start()
        return thread

    # -- internals: pins, room, load, evict --

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"no adapter registered as {name!r}; registered: {sorted(self._entries) or 'none'}")
        return entry

    def _pin(self, name: str) -> tuple[_Entry, _Loading | None, bool]:
        """Pin under the lock; (entry, load to wait for or to run, whether this caller runs it)."""
        victims: list[str] = []
        with self._lock:
            entry = self._entry(name)
            entry.pins += 1
            if entry.model_name is not None:
                self._lru.move_to_end(name)
                self._stats.hits += 1
                return entry, None, False
            if entry.loading is not None:
                return entry, entry.loading, False
            try:
                victims = self._make_room(entry)
            except StoreFullError:
                entry.pins -= 1
                raise
            entry.loading = _Loading()
            self._lru[name] = entry
            self._used_bytes += entry.nbytes
        self._delete_from_model(victims)
        return entry, entry.loading, True

    def _make_room(self, entry: _Entry) -> list[str]:
        """Evict least recently used, unpinned adapters until `entry` fits; their model names (lock held)."""
        victims = []
        candidates = (e for e in list(self._lru.values()) if e.pins == 0 and e.model_name is not None)
        while self._over_cap(len(self._lru) + 1, self._used_bytes + entry.nbytes):
            victim = next(candidates, None)
            if victim is None:
                raise StoreFullError(
                    f"cannot load adapter {entry.name!r} ({entry.nbytes:,} bytes): the {len(self._lru)} loaded adapters "
                    f"({self._used_bytes:,} bytes; caps: max_loaded={self.max_loaded}, max_bytes={self.max_bytes}) "
                    "are all in use; retry when requests finish"
                )
            victims += self._forget(victim)
            self._stats.evictions += 1
        return victims

    def _over_cap(self, count: int, nbytes: int) -> bool:
        return (self.max_loaded is not None and count > self.max_loaded) or (self.max_bytes is not None and nbytes > self.max_bytes)

    def _forget(self, entry: _Entry) -> list[str]:
        """Take a loaded entry out of the cache (lock held); returns its names on the model to delete (a mixture's
        experts after it; none while it is still loading)."""
        del self._lru[entry.name]
        self._used_bytes -= entry.nbytes
        model_names = [entry.model_name, *entry.parts] if entry.model_name is not None else []
        self._by_model_name.pop(entry.model_name, None)
        entry.model_name, entry.parts = None, []
        return model_names

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1

    def _load(self, entry: _Entry, loading: _Loading) -> None:
        model_name = f"{re.sub(r'[^A-Za-z0-9_-]', '_', entry.name)}@{next(self._ids)}"
        try:
            # Outside the model lock: running batches go on while the files are read and checked.
            self._resolve(entry.path)  # again: the directory may have become a link out of the root
            files = self._servable(entry.path)
            # Parameters made under a caller's inference_mode could never be used with autograd again.
            with torch.inference_mode(False):
                # Built, filled and copied into free slots off the model; only attaching and publishing take the lock.
                if isinstance(files, MixtureFiles):
                    prepared = prepare_mixture(self.model, files, model_name, slot_capacity=self.max_loaded)
                    commit, discard, parts = commit_mixture, discard_mixture, prepared.expert_names
                else:
                    prepared = prepare_adapter(self.model, files, read_adapter_tensors(entry.path), model_name,
                                               slot_capacity=self.max_loaded)
                    commit, discard, parts = commit_adapter, discard_adapter, []
                with self.model_lock:
                    if is_merged(self.model):
                        discard(prepared)
                        raise MergeStateError("the model has merged adapters; call lorakit.unmerge(model) before serving adapters")
                    active = active_adapters(self.model)
                    commit(self.model, prepared, activate=False)
                    if active_adapters(self.model) != active:  # loading never changes what a plain forward runs
                        set_active(self.model, active)
            nbytes = sum(_adapter_bytes(self.model, m) for m in [model_name, *parts])
        except BaseException as e:
            with self._lock:
                self._lru.pop(entry.name, None)
                self._used_bytes -= entry.nbytes
                entry.loading = None
                self._stats.failed_loads += 1
            loading.error = e
            loading.done.set()
            raise
        with self._lock:  # publish: from here on, acquire() hands out the complete adapter
            self._used_bytes += nbytes - entry.nbytes
            entry.nbytes, entry.model_name, entry.parts, entry.loading = nbytes, model_name, parts, None
            self._by_model_name[model_name] = entry
            self._stats.loads += 1
        loading.done.set()

    def _delete_from_model(self, model_names: list[str | None]) -> None:
        model_names = [m for m in model_names if m is not None]
        if not model_names:
            return
        with self.model_lock:
            for model_name in model_names:
                delete_adapter(self.model, model_name)  # frees its per-row slots for the next load

    # -- checks --

    def _resolve(self, path: str | Path) -> Path:
        return resolve_in_root(path, self.root)

    def _check_adapter(self, path: Path) -> int:
        """Refuse what is not an adapter servable on this base, with the reason; return its bytes once loaded."""
        files = self._servable(path)
        if self.max_bytes is not None and files.nbytes > self.max_bytes:
            raise StoreFullError(f"adapter {str(path)!r} needs {files.nbytes:,} bytes, more than the store's max_bytes={self.max_bytes:,}")
        return files.nbytes

    def _servable(self, path: Path) -> AdapterFiles | MixtureFiles:
        return servable_files(path, self._modules, self.root)  # against the module snapshot: no lock


def _adapter_bytes(model: nn.Module, adapter: str) -> int:
    return sum(p.numel() * p.element_size() for _, _, a in adapter_layers(model, adapter) for p in a.parameters())
