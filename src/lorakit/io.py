"""Adapter files in PEFT's format (adapter_config.json + adapter_model.safetensors): save, validate, load.

Only safetensors is read: a pickle can run code, so `adapter_model.bin` is refused with a way out.
`check_adapter_files` is the one validator (header, names, shapes, dtypes, before any tensor data is read);
loading and the server's adapter store both use it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import delete_adapter
from .errors import (
    AdapterFileError,
    AdapterFileNotFoundError,
    AdapterNotFoundError,
    ConfigError,
    IncompatibleAdapterError,
    ShapeMismatchError,
    TargetModulesNotFoundError,
)
from .files import atomic_write, atomic_write_json
from .inject import inject
from .layers import LAYER_TYPES, LoraLayer, adapter_dtype, layer_type
from .matching import base_of, logical_modules, saved_target_modules
from .state import ModulesToSave, adapter_layers, get_state, save_wrappers
from .variants import ADAPTERS, adapter_class, config_from_peft

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# --- save ----------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, adapter: str, residual_form: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (`base_model.model.<module>.lora_A.weight`, ...)."""
    state = get_state(model)
    config = state.configs[adapter]
    tensors: dict[str, torch.Tensor] = dict(adapter_class(config).model_tensors(model, adapter))
    for name, layer, a in adapter_layers(model, adapter):
        own = a.residual_tensors(layer) if residual_form and hasattr(a, "residual_tensors") else a.peft_tensors(layer)
        for suffix, t in own.items():
            tensors[f"{PREFIX}{name}.{suffix}"] = t
        if config.bias != "none" and getattr(layer.base_layer, "bias", None) is not None:
            tensors[f"{PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    for name, wrapper in save_wrappers(model):
        if adapter in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[adapter].named_parameters():
                tensors[f"{PREFIX}{name}.{pname}"] = p
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and "original_module" not in pname and "modules_to_save" not in pname:
                tensors.setdefault(f"{PREFIX}{pname}", p)
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None,
                 residual_form: bool = False) -> Path:
    """Write `adapter` (default: the first active one) to `path` in PEFT's format, each file atomically.

    The files apply to the untouched base. PiSSA/OLoRA adapters (whose base holds a residual) are therefore
    written as the equivalent plain LoRA of rank 2r; `residual_form=True` writes them as they are instead
    (PEFT's own form, which reloads by re-initialising from the same base: what checkpoints use).
    """
    state = get_state(model)
    if state is None or not state.configs:
        raise AdapterFileError("the model has no LoRA adapter to save; call lorakit.inject(model, config) first")
    if adapter is None:
        adapter = state.active[0].name if state.active else next(iter(state.configs))
    if adapter not in state.configs:
        raise AdapterNotFoundError(f"no adapter named {adapter!r}; the model has: {list(state.configs)}")
    config = state.configs[adapter]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, adapter, residual_form)
    if not residual_form:
        config = adapter_class(config).saved_config(config)
    peft = config.to_peft_dict(target_modules=saved_target_modules(model, config, state.targets[adapter]))
    if peft["base_model_name_or_path"] is None:
        peft["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    # PEFT reads GPT-2's transposed Conv1D weights with fan_in_fan_out=True (and warns otherwise).
    peft["fan_in_fan_out"] = any(layer.type.fan_in_fan_out for _, layer, _ in adapter_layers(model, adapter))
    if peft["task_type"] is None:
        peft["task_type"] = _guess_task_type(model)
    return write_adapter_files(path, peft, tensors)


def write_adapter_files(path: str | os.PathLike, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter directory from PEFT's config dict and tensors keyed as in the file, each file atomically.
    Weights first, config last: a directory with a config always has the weights that go with it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_NAME, peft_config)
    return path


def _guess_task_type(model: nn.Module) -> str | None:
    """CAUSAL_LM for language models. Not SEQ_CLS: PEFT would then expect a trained classifier in the file."""
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


# --- read and validate ---------------------------------------------------------------------------


def read_adapter_config(path: str | os.PathLike):
    """Read and validate `path/adapter_config.json` (PEFT's or ours): a LoraConfig or a variant's config."""
    path = Path(path)
    try:
        return config_from_peft(_read_config_json(path))
    except ConfigError as e:
        raise AdapterFileError(f"{path / CONFIG_NAME}: {e}") from None


def _read_config_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise AdapterFileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise AdapterFileError(f"{str(path)!r} is a file; pass the adapter's directory (holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    file = path / CONFIG_NAME
    if not file.exists():
        raise AdapterFileNotFoundError(f"{file} is missing: {str(path)!r} is not a LoRA adapter directory")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load `path/adapter_model.safetensors` with the `base_model.model.` prefix removed."""
    file = _weights_file(Path(path))
    try:
        return {_strip_prefix(k): v for k, v in load_file(file).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{file} is not a readable safetensors file ({e}); the file is corrupt or truncated") from None


def read_tensor_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's (shape, safetensors dtype) from the file's header, without reading any data."""
    file = _weights_file(Path(path))
    try:
        with safe_open(str(file), framework="pt") as f:
            return {_strip_prefix(k): (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{file} is not a readable safetensors file ({e}); the file is corrupt or truncated") from None


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS_NAME
    if not file.exists():
        pickled = [p.name for p in (path / "adapter_model.bin", path / "adapter_model.pt") if p.exists()]
        hint = (
            f" It has {pickled[0]}, a pickle, which lorakit never loads because unpickling can run code; convert it "
            "with safetensors.torch.save_file(torch.load(f, weights_only=True), 'adapter_model.safetensors')."
            if pickled else ""
        )
        raise AdapterFileNotFoundError(f"{file} is missing.{hint}")
    return file


def _strip_prefix(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


@dataclass
class FileTensor:
    """One tensor of an adapter file, resolved against the model: a factor of a layer, or another parameter."""

    key: str  # in the file, prefix removed
    shape: tuple[int, ...]
    module: str  # the layer (for factors) or the parameter's logical name (for others)
    name: str | None  # the factor's canonical PEFT name (e.g. "lora_A.weight"); None for biases and saved modules


@dataclass
class AdapterFiles:
    """What `check_adapter_files` found: the config, every tensor resolved, and the bytes the adapter takes loaded."""

    path: Path
    config: Any
    tensors: list[FileTensor] = field(default_factory=list)
    nbytes: int = 0

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(t.module for t in self.tensors if t.name is not None and t.module))  # not model-level


def check_adapter_files(path: str | os.PathLike, model: nn.Module | None = None,
                        modules: dict[str, nn.Module] | None = None) -> AdapterFiles:
    """Validate an adapter directory against a model before loading any tensor data: the config, the
    weights header, that every tensor names a module the model has, of a layer type the method supports,
    with the right shape, rank and a floating-point dtype. Errors name the file, the tensor and the fix.

    `modules` (name -> module, from `logical_modules`) may replace `model`, e.g. a snapshot taken under a lock.
    """
    path = Path(path)
    config = read_adapter_config(path)
    header = read_tensor_header(path)
    file = path / WEIGHTS_NAME
    if modules is None:
        modules = dict(logical_modules(model))
    params = _logical_params(modules)
    cls = adapter_class(config)
    result = AdapterFiles(path, config)
    ranks: dict[str, int] = {}
    for key, (shape, dtype_name) in sorted(header.items()):
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise AdapterFileError(f"{file}: tensor {key!r} has dtype {dtype_name}; adapter tensors must be floating point")
        factor = split_factor_key(key)
        if factor is None:
            if cls.is_model_tensor(key):
                result.nbytes += _numel(shape) * adapter_dtype(dtype).itemsize
                result.tensors.append(FileTensor(key, shape, "", key))
                continue
            logical = key.replace(".base_layer.", ".")
            target = params.get(logical)
            if target is None:
                raise IncompatibleAdapterError(
                    f"{file} has a tensor {key!r} that matches no LoRA factor, bias or saved module of this model"
                )
            _check_shape(shape, tuple(target.shape), key, file)
            result.nbytes += _numel(shape) * target.element_size()
            result.tensors.append(FileTensor(key, shape, logical, None))
            continue
        module_name, token = factor
        base = modules.get(module_name)
        if base is None:
            raise IncompatibleAdapterError(
                f"adapter {str(path)!r} (written for {config.base_model_name_or_path or 'an unknown base'}) names "
                f"module {module_name!r}, which this {_model_name(model, modules)} does not have; it was made for another architecture"
            )
        base = base_of(base)
        ltype = layer_type(base)
        expected = cls.expected_shapes(ltype, base) if ltype is not None else {}
        name = next((n for n in expected if n.split(".")[0] == token), None)
        if name is None:
            what = type(base).__name__ if ltype is None else f"a {ltype.name} layer"
            raise IncompatibleAdapterError(
                f"{file}: {key!r} does not fit {module_name!r} ({what}) for a {config.method} adapter; "
                f"expected tensors there: {sorted(expected) or 'none (this layer type is not supported)'}"
            )
        ranks[module_name] = _check_factor_shape(shape, expected[name], ranks.get(module_name), config, module_name, key, file)
        result.nbytes += _numel(shape) * adapter_dtype(base.weight.dtype).itemsize
        result.tensors.append(FileTensor(key, shape, module_name, name))
    _check_complete(result, cls, modules, file)
    return result


def split_factor_key(key: str) -> tuple[str, str] | None:
    """(module, factor token) for a key like `model.layers.0.q_proj.lora_A.weight`; also accepts an adapter
    name inside (`lora_A.default.weight`), as some tools write it. None for other tensors."""
    m = _factor_pattern().match(key)
    return (m.group("module"), m.group("token")) if m else None


_PATTERN: list = []


def _factor_pattern() -> re.Pattern:
    if not _PATTERN:
        tokens = {n.split(".")[0] for cls in ADAPTERS.values() for _, lt in LAYER_TYPES for n in cls.peft_names(lt)}
        alternatives = "|".join(sorted(map(re.escape, tokens), key=len, reverse=True))
        _PATTERN.append(re.compile(rf"^(?P<module>.+?)\.(?P<token>{alternatives})(?:\.[^.]+)?(?:\.weight)?$"))
    return _PATTERN[0]


def _logical_params(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters by their plain-model names (as if no LoRA wrapper were there): where biases and saved modules go."""
    params = {}
    for name, module in modules.items():
        if isinstance(module, ModulesToSave):  # logical_modules does not descend into it
            own, recurse = module.original_module, True
        else:
            own, recurse = (module.base_layer if isinstance(module, LoraLayer) else module), False
        for pname, p in own.named_parameters(recurse=recurse):
            params[f"{name}.{pname}" if name else pname] = p
    return params


def _check_factor_shape(shape, expected, rank, config, module, key, file) -> int:
    fits = len(shape) == len(expected) and all(e is None or e == n for n, e in zip(shape, expected))
    if not fits:
        r = rank if rank is not None else config.rank_for(module)
        need = "(" + ", ".join(str(r if e is None else e) for e in expected) + ")"
        raise ShapeMismatchError(f"{file}: tensor {key} has shape {tuple(shape)} but {module!r} needs {need}; "
                                 "the adapter was trained on a base with other layer sizes")
    found = {n for n, e in zip(shape, expected) if e is None}
    for r in found:
        want = rank if rank is not None else config.rank_for(module)
        if r != want:
            raise ShapeMismatchError(f"{file}: tensor {key} has rank {r} but its config gives {module!r} rank {want}; "
                                     "the config and the weights disagree")
        rank = r
    return rank if rank is not None else config.rank_for(module)


def _check_shape(shape, expected, key, file) -> None:
    if tuple(shape) != tuple(expected):
        raise ShapeMismatchError(f"{file}: tensor {key} has shape {tuple(shape)} but the model's needs {tuple(expected)}; "
                                 "the adapter was trained on a model with other layer sizes")


def _check_complete(result: AdapterFiles, cls, modules, file) -> None:
    """Every layer the file touches has all of the method's tensors."""
    found: dict[str, set[str]] = {}
    for t in result.tensors:
        if t.name is not None and t.module:
            found.setdefault(t.module, set()).add(t.name)
    for module, names in found.items():
        base = base_of(modules[module])
        missing = sorted(set(cls.expected_shapes(layer_type(base), base)) - names)
        if missing:
            raise IncompatibleAdapterError(f"{file} has no {', '.join(missing)} for {module!r}; the file is incomplete")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _model_name(model, modules) -> str:
    return type(model).__name__ if model is not None else type(modules.get("", None)).__name__


# --- load ----------------------------------------------------------------------------------------


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default",
                 activate: bool = True, trainable: bool = False) -> nn.Module:
    """Add the adapter stored at `path` (PEFT's format) to `model` under `adapter`; works on a plain model too.

    Nothing is left half-loaded: on any error the adapter is removed again and the model is as before.
    """
    files = check_adapter_files(path, model)
    tensors = read_adapter_tensors(path)
    try:
        inject(model, files.config, adapter=adapter, activate=activate)
    except TargetModulesNotFoundError as e:
        raise IncompatibleAdapterError(f"adapter {str(path)!r} does not fit this {type(model).__name__}: {e}") from None
    try:
        copy_adapter_tensors(model, adapter, files, tensors)
    except BaseException:
        delete_adapter(model, adapter)
        raise
    if not trainable:
        for _, _, a in adapter_layers(model, adapter):
            a.requires_grad_(False)
        for _, wrapper in save_wrappers(model):
            if adapter in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter].requires_grad_(False)
    return model


def load_adapter_weights(model: nn.Module, adapter: str, path: str | os.PathLike) -> None:
    """Overwrite the tensors of `adapter` (already on the model) with those stored at `path` (e.g. a checkpoint)."""
    files = check_adapter_files(path, model)
    copy_adapter_tensors(model, adapter, files, read_adapter_tensors(path))


@torch.no_grad()
def copy_adapter_tensors(model: nn.Module, adapter: str, files: AdapterFiles, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked file tensors into `adapter` (already injected): factors, biases, saved-module weights."""
    file = files.path / WEIGHTS_NAME
    layers = {name: (layer, a) for name, layer, a in adapter_layers(model, adapter)}
    cls = adapter_class(files.config)
    filled: set[str] = set()
    model_tensors = {}
    for t in files.tensors:
        value = tensors[t.key]
        if t.name is None:
            _copy_other(model, adapter, t, value, file)
        elif not t.module:
            model_tensors[t.name] = value
        else:
            if t.module not in layers:
                raise IncompatibleAdapterError(
                    f"{file} has {t.key!r}, but its config does not target {t.module!r}; the config and weights disagree"
                )
            layer, a = layers[t.module]
            load_checked(a.load_targets(layer)[t.name], value, t.key, file)
            filled.add(t.module)
    if model_tensors:
        cls.load_model_tensors(model, adapter, model_tensors, file)
    missing = sorted(set(layers) - filled)
    if missing:
        raise IncompatibleAdapterError(f"{file} has no tensors for {missing[:3]}, which its config targets; the file is incomplete")


def _copy_other(model: nn.Module, adapter: str, t: FileTensor, value: torch.Tensor, file: Path) -> None:
    """Biases (bias='lora_only'/'all'), saved modules (modules_to_save) and PEFT's saved embedding copies."""
    module_name, _, pname = t.module.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(module, LoraLayer):
        if pname == "weight":  # PEFT saves embedding weights it may have resized; we never replace base weights
            target = module.base_layer.weight
            if target.shape != value.shape or not torch.equal(target.detach().cpu().to(value.dtype), value):
                raise IncompatibleAdapterError(
                    f"{file} carries its own {t.key!r} (e.g. a resized vocabulary); lorakit does not replace base weights"
                )
            return
        load_checked(getattr(module.base_layer, pname), value, t.key, file)
        return
    for wname, wrapper in save_wrappers(model):
        if t.module.startswith(wname + ".") and adapter in wrapper.modules_to_save:
            params = dict(wrapper.modules_to_save[adapter].named_parameters())
            load_checked(params[t.module[len(wname) + 1:]], value, t.key, file)
            return
    if pname == "bias":
        load_checked(getattr(module, pname), value, t.key, file)
        return
    raise IncompatibleAdapterError(f"{file} has a tensor {t.key!r} that matches no LoRA factor, bias or saved module of this model")


def load_checked(target: torch.Tensor, value: torch.Tensor, name: str, file: Path) -> None:
    """Copy `value` into `target` after checking its shape and that it holds only finite numbers."""
    if tuple(target.shape) != tuple(value.shape):
        raise ShapeMismatchError(
            f"{file}: tensor for {name} has shape {tuple(value.shape)} but the layer needs {tuple(target.shape)}; "
            "the adapter was trained on a model with other layer sizes or another rank"
        )
    if not torch.isfinite(value).all():
        raise AdapterFileError(f"{file}: tensor for {name} holds NaN or Inf values; the adapter is corrupt")
    target.copy_(value.to(device=target.device, dtype=target.dtype))
