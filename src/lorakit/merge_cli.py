"""`lorakit merge`: base directory + adapter directory -> a plain merged model directory, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .device import resolve_device
from .errors import ConfigError
from .files import atomic_directory
from .hf import DTYPES, has_tokenizer, load_base_model, load_tokenizer, resolve_base, stored_dtype
from .io import load_adapter, read_adapter_config
from .merge import merge_and_unload


def merge_to_directory(base: str, adapter: str, out: str, dtype: str | None = None, overwrite: bool = False,
                       device: str | torch.device = "auto") -> Path:
    """Write base + adapter as one plain model to `out`, stored in `dtype` (default: the dtype the base's own
    weights are stored in, so a float16 base gives a float16 model of the same size). The merge runs on `device`."""
    device = resolve_device(device)  # first: a GPU that is not there is said before anything loads
    base_dir = resolve_base(base)
    out_path = Path(out)
    _check_out(out_path, base_dir, Path(adapter), overwrite)
    config = read_adapter_config(adapter)
    save_dtype = DTYPES[dtype] if dtype else stored_dtype(base_dir)
    # Without --dtype the merge runs in float32 and is rounded once, to the base's dtype, when saved.
    model = load_base_model(base_dir, config.task_type or "CAUSAL_LM", dtype=dtype or torch.float32).to(device)
    load_adapter(model, adapter)
    model = merge_and_unload(model)
    if save_dtype is not None:
        model.to(save_dtype)
    with atomic_directory(out_path) as tmp:  # the old directory is replaced only once the new one is complete
        model.save_pretrained(tmp)
        if has_tokenizer(base_dir):
            load_tokenizer(base_dir).save_pretrained(tmp)
        if dtype is None:
            _keep_load_dtype(base_dir, tmp)
    return out_path


def _check_out(out: Path, base: Path, adapter: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    resolved = out.resolve()
    for what, path in (("base model", base), ("adapter", adapter)):
        if resolved == path.resolve() or resolved in path.resolve().parents:
            raise ConfigError(f"--out {out} holds the {what} ({path}); choose another --out")
    if not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
    if not (out / "config.json").is_file():
        raise ConfigError(f"--out {out} is not a model directory (no config.json); lorakit replaces only a model it "
                          "could have written there: choose another --out")


def _keep_load_dtype(base: Path, out: Path) -> None:
    """Copy the dtype the base's config asks for on load (the built-in model: float32 over float16 storage)."""
    base_config = json.loads((base / "config.json").read_text())
    key = "dtype" if "dtype" in base_config else "torch_dtype" if "torch_dtype" in base_config else None
    if key is None:
        return
    merged = json.loads((out / "config.json").read_text())
    merged.pop("torch_dtype", None)
    merged["dtype"] = base_config[key]
    (out / "config.json").write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
