"""Mixtures of LoRAs: build one from expert adapter directories, save it (routers + copies of the experts' PEFT
files) and load it back; check a saved one and load it in two steps (off the model, then a short attach), as a
server does. The router and its math live in lorakit.variants.mixture."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..adapters import active_adapters, delete_adapter, list_adapters, set_active
from ..errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterFileNotFoundError,
    ConfigError,
    IncompatibleAdapterError,
    LorakitError,
    ShapeMismatchError,
)
from ..files import atomic_write, atomic_write_json
from ..inject import Built, attach, build, inject
from ..io import (
    _DTYPES,
    AdapterFiles,
    PreparedAdapter,
    check_adapter_files,
    commit_adapter,
    discard_adapter,
    load_adapter,
    load_checked,
    prepare_adapter,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
)
from ..layers import adapter_dtype, layer_type
from ..matching import base_of, logical_modules
from ..state import adapter_layers, get_state
from ..variants.mixture import MixtureAdapter, MixtureConfig

CONFIG_FILE = "mixture_config.json"
ROUTER_FILE = "router.safetensors"
EXPERTS_DIR = "experts"


def add_mixture(model: nn.Module, config: MixtureConfig, name: str = "mixture") -> nn.Module:
    """Load each expert (frozen, inactive) and put a router on every layer any expert adapts; the mixture is
    made the active, trainable adapter. Returns `model`."""
    taken = [e for e in list(config.experts) + [name] if e in list_adapters(model)]
    if taken:
        raise AdapterExistsError(f"the model already has adapters named {taken}; pick other expert/mixture names")
    state_before = list_adapters(model)
    try:
        for expert, path in config.experts.items():
            load_adapter(model, path, adapter=expert, activate=False, trainable=False)
            expert_config = get_state(model).configs[expert]
            if getattr(expert_config, "modules_to_save", None):
                raise IncompatibleAdapterError(f"expert {expert!r} ({path}) trains full modules "
                                               f"{expert_config.modules_to_save}; mixtures route LoRA-style experts only")
        state = get_state(model)
        targets = list(dict.fromkeys(t for e in config.experts for t in state.targets[e]))
        first = state.configs[next(iter(config.experts))]
        config = config.replace(target_modules=targets, task_type=first.task_type,
                                base_model_name_or_path=first.base_model_name_or_path)
        inject(model, config, adapter=name)
    except BaseException:
        for added in [a for a in list_adapters(model) if a not in state_before]:
            delete_adapter(model, added)
        raise
    return model


def mixture_balance_loss(model: nn.Module, name: str = "mixture") -> torch.Tensor | None:
    """The mean load-balancing loss over the mixture's layers in the last training forward (None if none ran)."""
    losses = [a.balance_loss for _, _, a in adapter_layers(model, name) if a.balance_loss is not None]
    return torch.stack(losses).mean() if losses else None


def save_mixture(model: nn.Module, path: str | os.PathLike, name: str = "mixture") -> Path:
    """Write the mixture to `path`: mixture_config.json, router.safetensors and experts/<name>/ (PEFT files)."""
    config = _mixture_config(model, name)
    path = Path(path)
    for expert in config.experts:
        save_adapter(model, path / EXPERTS_DIR / expert, adapter=expert)
    save_routers(model, path, name)
    atomic_write_json(path / CONFIG_FILE, {
        # A list, not a mapping: the order of the experts is the order of each router's outputs.
        "format": "lorakit-mixture", "experts": [[e, f"{EXPERTS_DIR}/{e}"] for e in config.experts],
        "top_k": config.top_k, "router": config.router, "load_balance": config.load_balance,
        "task_type": config.task_type, "base_model_name_or_path": config.base_model_name_or_path,
    })
    return path


def load_mixture(model: nn.Module, path: str | os.PathLike, name: str = "mixture") -> nn.Module:
    """Add the mixture saved at `path` (experts and routers) to `model`, active; outputs equal the saved one's."""
    add_mixture(model, mixture_config(path), name=name)
    load_routers(model, path, name)
    return model


def save_routers(model: nn.Module, path: str | os.PathLike, name: str = "mixture") -> None:
    """Only the routers (what trains): path/router.safetensors, atomically."""
    from safetensors.torch import save_file

    routers = {f"{layer}.router.weight": a.router.weight.detach().cpu().contiguous()
               for layer, _, a in adapter_layers(model, name)}
    atomic_write(Path(path) / ROUTER_FILE, lambda tmp: save_file(routers, tmp, metadata={"format": "pt"}))


def load_routers(model: nn.Module, path: str | os.PathLike, name: str = "mixture") -> None:
    """Copy path/router.safetensors into the routers of mixture `name` (already on the model)."""
    fill_routers({layer: a for layer, _, a in adapter_layers(model, name)}, read_routers(path), path)


def read_routers(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of path/router.safetensors ({layer}.router.weight), on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / ROUTER_FILE
    if not file.exists():
        raise AdapterFileNotFoundError(f"{file} is missing: the mixture's routers were not saved (save_mixture writes them)")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{file} is not a readable safetensors file ({e}); the file is corrupt or truncated") from None


def read_router_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each router's (shape, safetensors dtype) from path/router.safetensors' header, without reading any data."""
    from safetensors import SafetensorError, safe_open

    file = Path(path) / ROUTER_FILE
    if not file.exists():
        raise AdapterFileNotFoundError(f"{file} is missing: the mixture's routers were not saved (save_mixture writes them)")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{file} is not a readable safetensors file ({e}); the file is corrupt or truncated") from None


def fill_routers(layers: dict[str, MixtureAdapter], routers: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Copy the routers read from `path` into the mixture's router objects, {layer name: object}; every layer needs one."""
    path = Path(path)
    missing = sorted(set(layers) - {k.removesuffix(".router.weight") for k in routers})
    if missing:
        raise IncompatibleAdapterError(f"{path / ROUTER_FILE} has no router for {missing[:3]}; the mixture is incomplete")
    with torch.no_grad():
        for key, value in routers.items():
            layer = key.removesuffix(".router.weight")
            if layer not in layers:
                raise IncompatibleAdapterError(f"{path / ROUTER_FILE} has a router for {layer!r}, which no expert adapts")
            load_checked(layers[layer].router.weight, value, key, path / ROUTER_FILE)


def read_mixture_config(path: str | os.PathLike) -> dict:
    file = Path(path) / CONFIG_FILE
    if not file.exists():
        raise AdapterFileNotFoundError(f"{file} is missing: {path} is not a saved mixture (lorakit.save_mixture writes one)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file} is not valid JSON ({e})") from None
    experts = data.get("experts") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != "lorakit-mixture" or not isinstance(experts, list) or not all(
            isinstance(e, list) and len(e) == 2 and all(isinstance(part, str) for part in e) for e in experts):
        raise AdapterFileError(f"{file} is not a lorakit mixture config (format 'lorakit-mixture' with [name, path] experts)")
    names = [e for e, _ in experts]
    if len(set(names)) < len(names):
        raise AdapterFileError(f"{file} names an expert twice ({names}); each expert is one output of the routers")
    return data


def mixture_config(path: str | os.PathLike) -> MixtureConfig:
    """The saved mixture's config, each expert's directory made absolute (a relative one lies inside `path`)."""
    path = Path(path)
    data = read_mixture_config(path)
    try:
        return MixtureConfig(experts={e: str(path / rel) for e, rel in data["experts"]}, top_k=data.get("top_k"),
                             router=data.get("router", "token"), load_balance=data.get("load_balance", 0.01))
    except ConfigError as e:
        raise AdapterFileError(f"{path / CONFIG_FILE}: {e}") from None


def read_expert_configs(path: str | os.PathLike) -> dict:
    """Each expert's adapter config (io.read_adapter_config), {name: config} in the routers' order; no tensor is read.
    An error names the mixture, the expert and the file."""
    configs = {}
    for name, directory in mixture_config(path).experts.items():
        with naming_expert(path, name):
            configs[name] = read_adapter_config(directory)
    return configs


@contextlib.contextmanager
def naming_expert(path: str | os.PathLike, name: str) -> Iterator[None]:
    """Re-raise a lorakit error about one expert's files with the mixture and the expert in front: the expert's own
    message names only its directory, which the user may never have seen (save_mixture copied it there)."""
    try:
        yield
    except LorakitError as e:
        raise type(e)(f"mixture {str(path)!r}, expert {name!r}: {e}") from None


def is_mixture_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).exists()


def adapter_and_mixture_dirs(root: str | os.PathLike, adapter_config: str) -> list[Path]:
    """Every adapter directory (holding `adapter_config`) and saved mixture under `root`, sorted; the experts saved
    inside a mixture belong to it and are not listed on their own."""
    root = Path(root)
    mixtures = {p.parent for p in root.rglob(CONFIG_FILE)}
    adapters = {p.parent for p in root.rglob(adapter_config)}
    return sorted(mixtures | {a for a in adapters if not any(m in a.parents for m in mixtures)})


# --- a saved mixture checked, then loaded in two steps (a server's way) ---------------------------------


@dataclass
class MixtureFiles:
    """A saved mixture checked against a model before any tensor data is read."""

    path: Path
    config: MixtureConfig  # experts: name -> directory, in the order of the routers' outputs
    experts: dict[str, AdapterFiles]
    nbytes: int  # the experts' and routers' bytes once loaded


def check_mixture_files(path: str | os.PathLike, model: nn.Module | None = None,
                        modules: dict[str, nn.Module] | None = None,
                        check_expert: Callable[[Path], AdapterFiles] | None = None) -> MixtureFiles:
    """Validate a saved mixture: its config, each expert's files (io.check_adapter_files, or `check_expert(dir)`,
    e.g. a server's stricter check) and the router file's header: one router per layer the experts adapt, shaped
    (experts, features it reads). Errors name the file (an expert's, prefixed with the mixture and the expert).
    `modules` (name -> module, from `logical_modules`) may replace `model`, as for check_adapter_files."""
    path = Path(path)
    config = mixture_config(path)
    if modules is None:
        modules = dict(logical_modules(model))
    if check_expert is None:
        def check_expert(directory: Path) -> AdapterFiles:
            return check_adapter_files(directory, modules=modules)
    experts: dict[str, AdapterFiles] = {}
    for name, directory in config.experts.items():
        with naming_expert(path, name):
            files = check_expert(Path(directory))
        if getattr(files.config, "modules_to_save", None):
            raise IncompatibleAdapterError(f"mixture {str(path)!r}: expert {name!r} ({directory}) trains full modules "
                                           f"{files.config.modules_to_save}; mixtures route LoRA-style experts only")
        experts[name] = files
    nbytes = sum(f.nbytes for f in experts.values()) + _check_router_header(path, config, experts, modules)
    return MixtureFiles(path, config, experts, nbytes)


def _check_router_header(path: Path, config: MixtureConfig, experts: dict[str, AdapterFiles], modules) -> int:
    """Check router.safetensors' header against the experts' layers; the routers' bytes once loaded."""
    file, header = path / ROUTER_FILE, read_router_header(path)
    layers = dict.fromkeys(m for files in experts.values() for m in files.modules)
    nbytes = 0
    for key, (shape, dtype) in sorted(header.items()):
        layer = key.removesuffix(".router.weight")
        if layer == key or layer not in layers:
            raise IncompatibleAdapterError(f"{file} has {key!r}, which is not the router of a layer the experts adapt; "
                                           "the routers and the experts do not belong together")
        if dtype not in _DTYPES:
            raise AdapterFileError(f"{file}: tensor {key!r} has dtype {dtype}; routers must be floating point")
        base = base_of(modules[layer])
        expected = (len(config.experts), MixtureAdapter.router_width(layer_type(base), base))
        if shape != expected:
            raise ShapeMismatchError(f"{file}: {key!r} has shape {shape}, but {layer!r} needs {expected} (one row per "
                                     "expert, one column per feature the router reads)")
        nbytes += expected[0] * expected[1] * adapter_dtype(base.weight.dtype).itemsize
    missing = [layer for layer in layers if f"{layer}.router.weight" not in header]
    if missing:
        raise IncompatibleAdapterError(f"{file} has no router for {missing[:3]}, which the experts adapt; the mixture "
                                       "is incomplete")
    return nbytes


@dataclass
class PreparedMixture:
    """A mixture built and filled off the model: each expert an io.PreparedAdapter (per-row slots written), the
    routers built and filled. `commit_mixture` puts it on the model (cheap); `discard_mixture` gives it up."""

    name: str
    experts: list[PreparedAdapter]
    built: Built

    @property
    def expert_names(self) -> list[str]:
        """The experts' names on the model."""
        return [p.name for p in self.experts]


def prepare_mixture(model: nn.Module, files: MixtureFiles, name: str, slot_capacity: int | None = None) -> PreparedMixture:
    """Read the checked mixture's tensors and build it for `model`, for inference, without changing the model. Its
    experts are named `<name>/<expert>` on the model: internal adapters that go with the mixture."""
    prepared: list[PreparedAdapter] = []
    try:
        for expert, expert_files in files.experts.items():
            prepared.append(prepare_adapter(model, expert_files, read_adapter_tensors(expert_files.path),
                                            f"{name}/{expert}", slot_capacity=slot_capacity))
            for _, a in prepared[-1].built.objects:
                a.eval()  # inference: no dropout when the router runs an expert's own output()
        first = next(iter(files.experts.values())).config
        config = files.config.replace(
            experts={p.name: directory for p, directory in zip(prepared, files.config.experts.values())},
            target_modules=list(dict.fromkeys(t for p in prepared for t in p.built.targets)),
            task_type=first.task_type, base_model_name_or_path=first.base_model_name_or_path)
        built = build(model, config, name)
        routers = dict(built.objects)
        fill_routers(routers, read_routers(files.path), files.path)
        for router in routers.values():
            router.requires_grad_(False).eval()
    except BaseException:
        for p in prepared:
            discard_adapter(p)
        raise
    return PreparedMixture(name, prepared, built)


def commit_mixture(model: nn.Module, prepared: PreparedMixture, activate: bool = True) -> nn.Module:
    """Put a prepared mixture on the model: its experts (inactive), then its routers; active when `activate`, else
    the active adapters stay as they were. On any error the model is as before."""
    before, done = active_adapters(model), 0
    try:
        for p in prepared.experts:
            commit_adapter(model, p, activate=False)  # on its own error it discards itself
            done += 1
        attach(model, prepared.built, prepared.name, activate=activate, trainable=False)
    except BaseException:
        for p in prepared.experts[done + 1:]:
            discard_adapter(p)
        for p in prepared.experts[:done]:
            delete_adapter(model, p.name)
        raise
    if not activate and active_adapters(model) != before:
        set_active(model, before)
    return model


def discard_mixture(prepared: PreparedMixture) -> None:
    """Give back the per-row slots a prepared mixture's experts hold (a load that failed or was given up)."""
    for p in prepared.experts:
        discard_adapter(p)


def _mixture_config(model, name) -> MixtureConfig:
    state = get_state(model)
    config = state.configs.get(name) if state else None
    if not isinstance(config, MixtureConfig):
        raise ConfigError(f"the model has no mixture named {name!r}; add one with lorakit.add_mixture")
    return config
