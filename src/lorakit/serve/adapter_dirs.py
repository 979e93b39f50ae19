"""The adapter directories a server's store may serve: a path kept inside the adapter root (links out of it refused),
its files checked against the base without changing the model (a pure LoRA adapter on per-row layers, by
servable.py's rule, or a saved mixture of such experts, each inside the root), and the entries of a registry root."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..compose.mixture import (
    CONFIG_FILE as MIXTURE_CONFIG,
    ROUTER_FILE,
    MixtureFiles,
    adapter_and_mixture_dirs,
    check_mixture_files,
    is_mixture_dir,
)
from ..errors import AdapterFileError
from ..io import CONFIG_NAME, WEIGHTS_NAME, AdapterFiles, check_adapter_files
from ..servable import registry_dirs, require_servable


class AdapterPathError(AdapterFileError, PermissionError):
    """An adapter path outside the store's adapter root."""


def resolve_in_root(path: str | Path, root: Path | None) -> Path:
    """`path` resolved, a relative one taken from `root` (itself resolved); with a root, the directory and the files
    a load reads must lie inside it, so a symbolic link cannot lead a load out of it."""
    path = Path(path)
    if root is not None and not path.is_absolute():
        path = root / path
    resolved = path.resolve()
    if root is not None:
        files = (CONFIG_NAME, WEIGHTS_NAME, MIXTURE_CONFIG, ROUTER_FILE)
        for p in (resolved, *((resolved / f).resolve() for f in files)):
            if not p.is_relative_to(root):
                raise AdapterPathError(
                    f"adapter path {str(path)!r} resolves to {p}, outside the adapter root {root}; "
                    "put the adapter under the root (symbolic links out of it are refused too)"
                )
    return resolved


def servable_files(path: Path, modules: dict[str, nn.Module], root: Path | None) -> AdapterFiles | MixtureFiles:
    """The checked files of a pure LoRA adapter on per-row layers, or of a mixture of such experts, each inside
    `root`; checked against `modules` (the base's module snapshot, name -> module), so no model lock is needed."""
    if is_mixture_dir(path):
        return check_mixture_files(path, modules=modules,
                                   check_expert=lambda d: servable_adapter_files(resolve_in_root(d, root), modules))
    return servable_adapter_files(path, modules)


def servable_adapter_files(path: Path, modules: dict[str, nn.Module]) -> AdapterFiles:
    files = check_adapter_files(path, modules=modules)
    require_servable(files, modules)  # the rule `lorakit check --for lorakit` reports by
    return files


def registry_entries(root: Path) -> dict[str, Path]:
    """Every adapter directory and saved mixture under `root` by its relative path, e.g. `team/chat` (a mixture's
    own experts are part of it), with the first-level directories that hold weights but no adapter_config.json, so
    that a half-copied adapter is listed as broken rather than silently skipped."""
    entries = {}
    for directory in registry_dirs(root, adapter_and_mixture_dirs(root, CONFIG_NAME)):
        name = directory.relative_to(root).as_posix()
        if name != ".":
            entries[name] = directory
    return entries
