"""What lorakit's server serves side by side on one shared base: the one rule that `serve`'s adapter store refuses
by and `lorakit check --for lorakit` reports by, so that the check never says "ok" to an adapter the server refuses.

Side by side means per row on a base that every request shares: an adapter may add LoRA factors to layers the
per-row path knows, and nothing else (no trained copies of modules, no biases, no base changed in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .errors import IncompatibleAdapterError
from .layers import layer_type
from .matching import base_of
from .variants.pissa import is_residual_init


@dataclass
class Refusal:
    what: str  # why the server refuses the adapter, in a sentence that says what to do
    residual: bool = False  # saved for a residual base (PiSSA/OLoRA): a conversion to plain LoRA may exist


def refusals(path: str | Path, config: Any, files: Any = None, modules: dict[str, nn.Module] | None = None) -> list[Refusal]:
    """Why the server would refuse the adapter at `path` (empty: it serves it). `config` is its LoraConfig; with
    `files` (from `io.check_adapter_files`) and the base's `modules` (name -> module) its layers are judged too."""
    found = []
    if is_residual_init(getattr(config, "init", "") or ""):
        found.append(Refusal(
            f"adapter {str(path)!r} is a {config.init} adapter saved for a residual base (init_lora_weights="
            f"{config.init!r}); loading it would rewrite the shared base. Convert it once to the equivalent "
            "plain LoRA: lorakit convert ADAPTER --to lora --base BASE --out DIR (lorakit.pissa_to_lora)", residual=True))
    if config.modules_to_save or config.bias != "none":
        what = f"full copies of {config.modules_to_save}" if config.modules_to_save else f"biases (bias={config.bias!r})"
        found.append(Refusal(
            f"adapter {str(path)!r} trains {what}, which would change the base shared by every request; "
            "only pure LoRA adapters can be served side by side (merge this one into its own model instead)"))
    if files is not None and modules is not None:
        for module in files.modules:
            ltype = layer_type(base_of(modules[module]))
            if not ltype.per_row:
                found.append(Refusal(f"adapter {str(path)!r} adapts {module!r}, a {ltype.name} layer; per-row serving "
                                     "supports Linear, GPT-2 Conv1D and Embedding layers"))
                break
    return found


def require_servable(files: Any, modules: dict[str, nn.Module]) -> None:
    """Raise IncompatibleAdapterError with the first reason the server refuses these checked files."""
    found = refusals(files.path, files.config, files, modules)
    if found:
        raise IncompatibleAdapterError(found[0].what)


def registry_dirs(root: str | Path, entries: list[Path]) -> list[Path]:
    """The directories a registry root offers: its `entries` (the adapter directories and saved mixtures found under
    it) and each first-level directory that holds weights (*.safetensors, adapter_model.*) but no entry, a
    half-copied adapter: listed so that it is reported broken rather than silently skipped."""
    root = Path(root)
    found = set(entries)
    covered = {p.relative_to(root).parts[0] for p in found if p != root}
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in covered and _holds_weights(entry):
            found.add(entry)
    return sorted(found)


def _holds_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("adapter_model.*"))
