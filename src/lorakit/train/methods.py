"""What `--method` changes in `lorakit train`: which weights train, and how they are saved and restored.

Everything else (data, loop, schedule, evaluation, metrics) is the same for every method, so the study in
bench/quality.py compares methods and nothing else. A new method is a name in `config.METHODS` and an
entry in `METHODS` below.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..adapters import disabled
from ..config import LoraConfig
from ..inject import inject
from ..io import WEIGHTS_NAME, load_adapter_weights, save_adapter
from .checkpoint import CheckpointError
from .config import TrainConfig

ADAPTER = "default"


class LoraMethod:
    """Train an adapter on a frozen base; OUT receives the adapter in PEFT's format."""

    weights_file = WEIGHTS_NAME
    output_name = "adapter (PEFT format)"

    def prepare(self, model: nn.Module, config: TrainConfig) -> None:
        inject(model, self.lora_config(config), adapter=ADAPTER, strict=True)  # a mistyped --targets name is an error

    def lora_config(self, config: TrainConfig) -> LoraConfig:
        return LoraConfig(r=config.rank, alpha=config.alpha, dropout=config.dropout, target_modules=config.targets,
                          layers_to_transform=config.layers_to_transform, rslora=config.rslora, init=config.init,
                          task_type="SEQ_CLS" if config.task == "classify" else "CAUSAL_LM",
                          base_model_name_or_path=str(config.base))

    def model_dtype(self, config: TrainConfig) -> torch.dtype:
        return torch.bfloat16 if config.precision == "bf16" else torch.float32

    def base_model(self, model: nn.Module):
        """A context in which `model` computes what the untrained base computes."""
        return disabled(model)

    def save(self, model: nn.Module, path: Path, tokenizer=None) -> None:
        save_adapter(model, path)

    def save_checkpoint_weights(self, model: nn.Module, path: Path) -> None:
        # As trained (PiSSA/OLoRA: A and B for the residual base), so that restore() copies them back exactly.
        save_adapter(model, path, residual_form=True)

    def restore(self, model: nn.Module, path: Path) -> None:
        load_adapter_weights(model, ADAPTER, path)


class FullMethod:
    """Train every weight; OUT receives a full model directory (`from_pretrained` loads it, tokenizer included)."""

    weights_file = "model.safetensors"
    output_name = "model directory (from_pretrained loads it)"

    def prepare(self, model: nn.Module, config: TrainConfig) -> None:
        model.requires_grad_(True)

    def model_dtype(self, config: TrainConfig) -> torch.dtype:
        # AdamW updates of size lr·1 vanish below bf16's resolution at weights near 1, so the weights stay
        # fp32 and --precision bf16 means bf16 compute (autocast), as in mixed-precision training.
        return torch.float32

    def base_model(self, model: nn.Module):
        return contextlib.nullcontext(model)  # asked before training starts, when the model is the base

    def save(self, model: nn.Module, path: Path, tokenizer=None) -> None:
        save_full_model(model, path, tokenizer)

    def save_checkpoint_weights(self, model: nn.Module, path: Path) -> None:
        save_full_model(model, path)

    def restore(self, model: nn.Module, path: Path) -> None:
        load_full_weights(model, path)


METHODS = {"lora": LoraMethod(), "full": FullMethod()}


def method_for(config: TrainConfig):
    return METHODS[config.method]


def save_full_model(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """`save_pretrained` (+ the tokenizer) into `path`, which may hold other files (metrics, checkpoints).

    Files are written to a temp directory beside them and renamed in, weights first and config.json last,
    so a directory with a config.json always has complete weights next to it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".save-", dir=path) as tmp, _quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for stale in path.glob("model*.safetensors*"):  # shards of an earlier save would mix with these
            if stale.name not in names:
                stale.unlink()
        for name in names:
            with open(Path(tmp) / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(Path(tmp) / name, path / name)
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """No "Writing model shards" bar between the training bar's lines at every checkpoint."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def load_full_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the weights `save_full_model` wrote back into `model` (same architecture); tied weights,
    which save_pretrained writes once, are accepted as missing."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no model*.safetensors; it is not a full fine-tuning checkpoint")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path} does not fit this model ({e}); it may come from another run") from None
    owner = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner.setdefault(id(p), []).append(name)
    loaded = set(state)
    untied = [k for k in result.missing_keys if not any(n in loaded for n in owner.get(id(_param(model, k)), []))]
    if untied or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit this model: missing {untied[:5]}, unexpected "
                              f"{result.unexpected_keys[:5]}; it may come from another run")


def _param(model: nn.Module, name: str):
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None
