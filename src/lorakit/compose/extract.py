"""Turn a full fine-tune into a LoRA adapter: per target layer, the truncated SVD of W_tuned − W_base.

The two checkpoints are read one tensor at a time from their safetensors files (never two whole models in
memory), the target layers are chosen by lorakit's own matching rules on a weightless (meta-device) copy of
the architecture, and each layer reports the share of ‖ΔW‖² its rank keeps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import LoraConfig
from ..errors import AdapterFileError, ConfigError, IncompatibleAdapterError
from ..hf import meta_model
from ..io import PREFIX, write_adapter_files
from ..layers import layer_type
from ..matching import match_targets, saved_target_modules
from . import lowrank


@dataclass
class LayerExtract:
    module: str
    rank: int
    energy_kept: float
    relative_error: float


@dataclass
class ExtractReport:
    out: Path
    layers: list[LayerExtract] = field(default_factory=list)
    other_changed: list[str] = field(default_factory=list)  # tensors that changed but are not in any LoRA

    def format(self) -> str:
        lines = [f"{lr.module:60s} r={lr.rank:<4d} energy kept {lr.energy_kept:7.2%}  relative error {lr.relative_error:.2e}"
                 for lr in self.layers]
        if self.layers:
            mean = sum(lr.energy_kept for lr in self.layers) / len(self.layers)
            lines.append(f"{len(self.layers)} layers, mean energy kept {mean:.2%}")
        if self.other_changed:
            lines.append(f"{len(self.other_changed)} other tensors changed in the fine-tune and are not in the adapter "
                         f"(e.g. {', '.join(self.other_changed[:3])}): norms, embeddings or heads a LoRA does not hold")
        lines.append(f"adapter written to {self.out}")
        return "\n".join(lines)


class _Checkpoint:
    """The tensors of a model directory's safetensors files (sharded or not), opened lazily, read one at a time."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise AdapterFileError(f"{self.path} is not a model directory (no config.json); pass a saved model's directory")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.path.glob("*.bin")]
            raise AdapterFileError(f"{self.path} has no .safetensors weights" + (
                f" ({pickled[0]} is a pickle, which lorakit does not load; re-save with save_pretrained(safe_serialization=True))"
                if pickled else ""))
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self.keys = {k: h for h in self._handles for k in h.keys()}
        self.config = json.loads((self.path / "config.json").read_text())

    def close(self) -> None:
        """Release the files now (their mappings would otherwise live until the garbage collector finds them)."""
        for h in self._handles:
            h.__exit__(None, None, None)
        self._handles, self.keys = [], {}

    def key_for(self, name: str) -> str | None:
        """The stored key of parameter `name`, allowing for a missing or extra top-level prefix."""
        if name in self.keys:
            return name
        head, _, rest = name.partition(".")
        for candidate in (rest, f"model.{name}"):
            if candidate in self.keys:
                return candidate
        return None

    def get(self, key: str) -> torch.Tensor:
        return self.keys[key].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.keys[key].get_slice(key).get_shape())


@torch.no_grad()
def extract_adapter(base: str | os.PathLike, tuned: str | os.PathLike, rank: int, out: str | os.PathLike,
                    targets: list[str] | str = "all-linear", progress: bool = True) -> ExtractReport:
    """Write to `out` a rank-`rank` LoRA adapter (scale 1) approximating `tuned` − `base` on the target layers."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    base_ck, tuned_ck = _Checkpoint(base), _Checkpoint(tuned)
    try:
        return _extract(base_ck, tuned_ck, rank, out, targets, progress, base)
    finally:
        base_ck.close()
        tuned_ck.close()


def _extract(base_ck, tuned_ck, rank, out, targets, progress, base) -> ExtractReport:
    _check_same_architecture(base_ck, tuned_ck)
    model = meta_model(base_ck.path)
    config = LoraConfig(r=rank, alpha=rank, target_modules=targets, task_type=_task_type(base_ck.config),
                        base_model_name_or_path=str(base))
    names = match_targets(model, config, strict=True)
    tensors, report = {}, ExtractReport(Path(out))
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="extract", disable=not progress):
        module = model.get_submodule(name)
        ltype = layer_type(module)
        if ltype is None or not ltype.is_linear:
            raise IncompatibleAdapterError(f"{name!r} is a {type(module).__name__}; extract handles Linear and GPT-2 "
                                           "Conv1D layers (pass --targets with linear layers only)")
        key = base_ck.key_for(f"{name}.weight")
        tuned_key = tuned_ck.key_for(f"{name}.weight")
        if key is None or tuned_key is None:
            where = base_ck.path if key is None else tuned_ck.path
            raise IncompatibleAdapterError(f"{where} has no tensor for {name}.weight; the checkpoints do not hold this architecture")
        delta = tuned_ck.get(tuned_key).float() - base_ck.get(key).float()
        if ltype.fan_in_fan_out:
            delta = delta.T  # Conv1D stores (in, out)
        U, S, Vh = lowrank.svd(delta)
        k = min(rank, len(S))
        A, B = lowrank.split(U, S, Vh, k)
        if k < rank:  # a layer narrower than the rank: pad with zeros so every layer has the config's rank
            A, B = torch.cat([A, A.new_zeros(rank - k, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], rank - k)], 1)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
        report.layers.append(LayerExtract(name, k, lowrank.energy_kept(S)[k - 1].item(), lowrank.relative_error(S, k)))
        del delta, U, S, Vh
    targeted = {base_ck.key_for(f"{n}.weight") for n in names}
    for key in base_ck.keys:
        if key not in targeted:
            other = tuned_ck.key_for(key)
            if other is not None and not torch.equal(base_ck.get(key), tuned_ck.get(other)):
                report.other_changed.append(key)
    peft = config.to_peft_dict(target_modules=saved_target_modules(model, config, names))
    peft["fan_in_fan_out"] = any(layer_type(model.get_submodule(n)).fan_in_fan_out for n in names)
    write_adapter_files(out, peft, tensors)
    return report


def _check_same_architecture(base: _Checkpoint, tuned: _Checkpoint) -> None:
    """Refuse checkpoints of different architectures, naming the first tensor that differs (with the config field
    that explains it, when one does)."""
    hint = ""
    for field_name in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "n_embd", "n_layer"):
        a, b = base.config.get(field_name), tuned.config.get(field_name)
        if a != b:
            hint = f" ({field_name} is {a!r} in the base and {b!r} in the tuned model)"
            break
    tensor = _first_mismatching_tensor(base, tuned)
    if tensor is None and not hint:
        return
    raise IncompatibleAdapterError(f"{base.path} and {tuned.path} are not the same architecture{hint}: "
                                   + (tensor or "their tensors have the same names and shapes, but their configs differ"))


def _first_mismatching_tensor(base: _Checkpoint, tuned: _Checkpoint) -> str | None:
    def in_order(keys):  # layer 10 after layer 9
        return sorted(keys, key=lambda k: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in k.split(".")])

    for key in in_order(base.keys):
        other = tuned.key_for(key)
        if other is None:
            return f"tensor {key!r} {base.shape(key)} of the base is missing from the tuned model"
        if base.shape(key) != tuned.shape(other):
            return f"tensor {key!r} is {base.shape(key)} in the base but {tuned.shape(other)} in the tuned model"
    for key in in_order(tuned.keys):
        if base.key_for(key) is None:
            return f"tensor {key!r} {tuned.shape(key)} of the tuned model is missing from the base"
    return None


def _task_type(config: dict) -> str | None:
    arch = (config.get("architectures") or [""])[0]
    return "CAUSAL_LM" if arch.endswith(("ForCausalLM", "LMHeadModel")) else None
