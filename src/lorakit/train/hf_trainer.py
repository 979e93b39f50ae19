"""Hugging Face's Trainer (and TRL's SFTTrainer, which builds on it) with a lorakit model: checkpoints and
`save_model()` write the adapter in PEFT's format, and resuming or `load_best_model_at_end` read it back.

Without this, Trainer sees an ordinary transformers model and saves all of it (the 135M built-in model: 548 MB,
under lorakit's internal key names). A PeftModel gets adapter-only saves because Trainer knows its class; a
lorakit model keeps its own class, so the trainer is told here:

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    adapter_checkpoints(trainer)
    trainer.train()                       # output_dir/checkpoint-N/: adapter_config.json + adapter_model.safetensors
    trainer.save_model("out/adapter")     # the adapter only; loads in lorakit, PEFT and vLLM
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterNotFoundError
from ..inject import get_state
from ..io import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from .checkpoint import load_adapter_weights


def adapter_checkpoints(trainer):
    """Make `trainer` save, resume and reload lorakit adapters (its model's first active one) in PEFT's format.

    Patches this trainer and its model only: `model.save_pretrained` writes the adapter (after
    `merge_and_unload` it saves the plain model as usual again), and the trainer's checkpoint loaders read
    adapter-only checkpoints. Returns `trainer`.
    """
    model = trainer.model
    if not _adapter(model):
        raise AdapterNotFoundError("adapter_checkpoints(trainer) needs a model with a lorakit adapter: call "
                                   "lorakit.inject() (or load_adapter) before building the trainer")

    def save_pretrained(save_directory, *args, is_main_process: bool = True, **kwargs):
        if not _adapter(model):  # merged and unloaded since: a plain model saves in full, as usual
            return type(model).save_pretrained(model, save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:  # the full state_dict Trainer passes is not needed: the adapter is read from the model
            save_adapter(model, save_directory, adapter=_adapter(model))

    load_from_checkpoint, load_best_model = trainer._load_from_checkpoint, trainer._load_best_model

    def _load_from_checkpoint(resume_from_checkpoint, model=None):
        if not _is_adapter_dir(resume_from_checkpoint):
            return load_from_checkpoint(resume_from_checkpoint, model)
        target = getattr(model, "module", model) if model is not None else trainer.model
        load_adapter_weights(target, _adapter(target), Path(resume_from_checkpoint))

    def _load_best_model():
        best = trainer.state.best_model_checkpoint
        if not best or not _is_adapter_dir(best):
            return load_best_model()
        load_adapter_weights(trainer.model, _adapter(trainer.model), Path(best))

    model.save_pretrained = save_pretrained
    trainer._load_from_checkpoint, trainer._load_best_model = _load_from_checkpoint, _load_best_model
    return trainer


def _adapter(model) -> str | None:
    """The adapter Trainer trains: the first active one (None on a model without lorakit adapters)."""
    state = get_state(model)
    if state is None or not state.configs:
        return None
    return state.active[0].name if state.active else next(iter(state.configs))


def _is_adapter_dir(path) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
