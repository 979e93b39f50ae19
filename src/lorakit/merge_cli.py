"""`lorakit merge`: base directory + adapter directory -> a plain merged model directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from .hf import has_tokenizer, load_base_model, load_tokenizer
from .io import load_adapter, read_adapter_config
from .merge import merge_and_unload


def merge_to_directory(base: str, adapter: str, out: str, dtype: str | None = None, quantize: str | None = None) -> Path:
    """With `quantize` (the adapter was trained on a 4-/8-bit base), the base is quantised as it was in training and
    the merged model is that base dequantised plus the adapter, in full precision: the model that was trained."""
    config = read_adapter_config(adapter)
    model = load_base_model(base, config.task_type or "CAUSAL_LM", dtype=dtype, quantize=quantize)
    load_adapter(model, adapter)
    model = merge_and_unload(model)
    out_path = Path(out)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if has_tokenizer(base):
        load_tokenizer(base).save_pretrained(tmp)
    if out_path.exists():
        shutil.rmtree(out_path)
    tmp.rename(out_path)
    return out_path
