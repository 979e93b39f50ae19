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
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import disabled
from ..config import LoraConfig
from ..errors import ConfigError
from ..files import atomic_write, set_default_permissions
from ..inject import inject
from ..io import WEIGHTS_NAME, load_adapter_weights, save_adapter
from ..variants.adalora import AdaLoraConfig
from ..variants.adalora_budget import adalora_orth_loss, adalora_step, adalora_training_state, load_adalora_training_state
from ..variants import VeraConfig
from .checkpoint import CheckpointError
from .config import TrainConfig

ADAPTER = "default"


class MethodHooks:
    """What a method may add to every step of the shared loop; nothing by default."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to each optimizer step's loss (e.g. a regulariser), or None."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Runs after optimizer step `step` (1, 2, ...), while the gradients are still there."""


class LoraMethod(MethodHooks):
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


class DoraMethod(LoraMethod):
    """DoRA: a LoRA adapter plus a trained magnitude per output feature (saved as PEFT's use_dora adapter)."""

    def lora_config(self, config: TrainConfig) -> LoraConfig:
        return super().lora_config(config).replace(use_dora=True)


class VeraMethod(LoraMethod):
    """Train a VeRA adapter (two vectors per layer around a frozen random projection); OUT receives PEFT's VERA format."""

    def lora_config(self, config: TrainConfig) -> VeraConfig:
        return VeraConfig(r=config.rank, dropout=config.dropout, target_modules=config.targets,
                          layers_to_transform=config.layers_to_transform,
                          task_type="SEQ_CLS" if config.task == "classify" else "CAUSAL_LM",
                          base_model_name_or_path=str(config.base))


class FullMethod(MethodHooks):
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


class AdaLoraMethod(LoraMethod):
    """AdaLoRA: the adapter starts at rank 1.5·--rank per layer and the allocator prunes it to --rank per layer on
    average (cubic schedule over 10%-80% of the steps, then fixed), with the orthogonality regulariser in the loss.
    OUT receives PEFT's ADALORA format; each save also writes the allocator's state, so --resume is exact."""

    state_file = "adalora_state.safetensors"

    def lora_config(self, config: TrainConfig) -> AdaLoraConfig:
        if config.rslora:
            raise ConfigError("--rslora does not apply to --method adalora (its scale is alpha/init_r); drop it")
        lora = super().lora_config(config)
        return AdaLoraConfig(init_r=config.rank + config.rank // 2, target_r=config.rank, alpha=config.alpha,
                             dropout=config.dropout, target_modules=lora.target_modules,
                             layers_to_transform=lora.layers_to_transform, task_type=lora.task_type,
                             base_model_name_or_path=lora.base_model_name_or_path, total_step=config.max_steps,
                             tinit=config.max_steps // 10, tfinal=config.max_steps // 5)

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return adalora_orth_loss(model, ADAPTER)

    def after_step(self, model: nn.Module, step: int) -> None:
        adalora_step(model, step, ADAPTER)

    def save(self, model: nn.Module, path: Path, tokenizer=None) -> None:
        save_adapter(model, path)
        state = adalora_training_state(model, ADAPTER)
        atomic_write(Path(path) / self.state_file, lambda tmp: save_file(state, tmp))

    def save_checkpoint_weights(self, model: nn.Module, path: Path) -> None:
        self.save(model, path)  # the adapter and the allocator's state: --resume continues exactly

    def restore(self, model: nn.Module, path: Path) -> None:
        file = Path(path) / self.state_file
        if not file.exists():
            raise CheckpointError(f"{file} is missing: an AdaLoRA checkpoint needs it to continue (the adapter file "
                                  "holds only the kept triplets); resume from a checkpoint written by --method adalora")
        load_adalora_training_state(model, load_file(file), ADAPTER)



class MixtureMethod(LoraMethod):
    """Train only the routers of a mixture over frozen experts; OUT receives the mixture (routers + experts)."""

    weights_file = "router.safetensors"

    def prepare(self, model: nn.Module, config: TrainConfig) -> None:
        from ..compose.mixture import add_mixture
        from ..variants.mixture import MixtureConfig

        add_mixture(model, MixtureConfig(experts=dict(config.mixture), top_k=config.top_k,
                                         load_balance=config.load_balance), name=ADAPTER)
        self.load_balance = config.load_balance

    def save(self, model: nn.Module, path: Path, tokenizer=None) -> None:
        from ..compose.mixture import save_mixture

        save_mixture(model, path, name=ADAPTER)

    def save_checkpoint_weights(self, model: nn.Module, path: Path) -> None:
        from ..compose.mixture import save_routers

        save_routers(model, path, name=ADAPTER)

    def restore(self, model: nn.Module, path: Path) -> None:
        from ..compose.mixture import load_routers

        load_routers(model, path, name=ADAPTER)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        from ..compose.mixture import mixture_balance_loss

        balance = mixture_balance_loss(model, ADAPTER)
        return None if balance is None or not self.load_balance else balance * self.load_balance


METHODS = {"lora": LoraMethod(), "dora": DoraMethod(), "adalora": AdaLoraMethod(), "vera": VeraMethod(),
           "full": FullMethod(), "mixture": MixtureMethod()}


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
        set_default_permissions(tmp)  # safetensors creates its file 0600; a normal write would not
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
