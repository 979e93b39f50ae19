"""Look inside an adapter directory: rank, α, targets, sizes, and how much of its rank each layer really uses; or
inside a saved mixture of LoRAs: its router settings and each expert as an adapter."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compose.mixture import CONFIG_FILE as MIXTURE_CONFIG
from .compose.mixture import ROUTER_FILE, mixture_config, naming_expert, read_mixture_config, read_router_header
from .io import CONFIG_NAME, WEIGHTS_NAME, split_factor_key, read_adapter_config, read_adapter_tensors
from .variants import adapter_class


@dataclass
class LayerReport:
    module: str
    rank: int
    effective_rank: int  # singular values needed to hold 90% of the update's energy
    norm: float


@dataclass
class AdapterReport:
    path: str
    method: str  # lora, dora, vera, adalora
    r: int
    alpha: float | None  # None: the method has no alpha (VeRA)
    scale: float
    rslora: bool
    target_modules: list[str] | str
    task_type: str | None
    base_model: str | None
    num_parameters: int
    file_bytes: int
    dtypes: list[str]
    layers: list[LayerReport] = field(default_factory=list)
    note: str | None = None  # why there is no per-layer report
    num_layers: int = 0  # layers the file adapts

    def format(self, layers: bool = False) -> str:
        """The summary; with `layers`, one line per layer after it."""
        lines = [
            f"adapter        {self.path}",
            f"method         {self.method}",
            f"base model     {self.base_model or 'unknown'}",
            f"task           {self.task_type or 'unknown'}",
            f"rank r         {self.r}",
            f"alpha          {'none' if self.alpha is None else f'{self.alpha:g}'}  (scale {self.scale:g}{', rsLoRA' if self.rslora else ''})",
            f"targets        {self.target_modules if isinstance(self.target_modules, str) else ', '.join(self.target_modules)}",
            f"layers         {self.num_layers or len(self.layers)}",
            f"parameters     {self.num_parameters:,}",
            f"file size      {_human(self.file_bytes)}  ({', '.join(self.dtypes)})",
        ]
        if self.layers:
            used = [lr.effective_rank for lr in self.layers]
            lines.append(f"effective rank {min(used)}-{max(used)} of r (90% of singular-value energy), mean {sum(used)/len(used):.1f}")
        if self.note:
            lines.append(f"effective rank {self.note}")
        if layers:
            lines += [f"  {lr.module:60s} r={lr.rank:<4d} effective={lr.effective_rank:<4d} |ΔW|={lr.norm:.4g}"
                      for lr in self.layers]
        return "\n".join(lines)


@dataclass
class MixtureReport:
    path: str
    experts: dict[str, AdapterReport]  # in the order of the routers' outputs
    top_k: int | None  # None: every expert, softmax-weighted
    router: str  # what a routing decision is made for ("token")
    load_balance: float
    router_layers: int
    router_parameters: int  # what trains (`train --mixture`): one row per expert at each layer an expert adapts
    file_bytes: int  # mixture_config.json and router.safetensors; each expert's files are in its own report
    task_type: str | None = None
    base_model: str | None = None

    def format(self, layers: bool = False) -> str:
        """The mixture's summary, then each expert's (indented); with `layers`, each expert's layers too."""
        top_k, n = "all" if self.top_k is None else self.top_k, len(self.experts)
        lines = [
            f"mixture        {self.path}",
            f"base model     {self.base_model or 'unknown'}",
            f"task           {self.task_type or 'unknown'}",
            f"experts        {n}: {', '.join(self.experts)}",
            f"router         per {self.router}, top_k {top_k} of {n}, load balance {self.load_balance:g}",
            f"router layers  {self.router_layers}",
            f"trainable      {self.router_parameters:,} router parameters (the experts are frozen)",
            f"file size      {_human(self.file_bytes)}  (routers and config; the experts' below)",
        ]
        for name, report in self.experts.items():
            lines += ["", f"expert {name}"] + ["  " + line for line in report.format(layers).splitlines()]
        return "\n".join(lines)


def inspect_adapter(path: str | os.PathLike, per_layer: bool = True) -> AdapterReport:
    path = Path(path)
    config = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        factor = split_factor_key(key)
        if factor:
            parts.setdefault(factor[0], {})[factor[1]] = value
    cls = adapter_class(config)
    layers, note = [], None
    if per_layer:
        for module, layer_parts in sorted(parts.items(), key=lambda item: _natural(item[0])):
            delta = cls.delta_from_file(layer_parts, config, module)
            if delta is None:  # the file alone does not determine ΔW (VeRA: a layer's input width is not in it)
                layers, note = [], f"not available: a {config.method} file alone does not determine each layer's update"
                break
            layers.append(_layer_report(module, delta, config.rank_for(module)))
    return AdapterReport(
        path=str(path), method=config.method, r=config.r, alpha=getattr(config, "alpha", None), scale=config.scale_for(""),
        rslora=getattr(config, "rslora", False), target_modules=config.target_modules, task_type=config.task_type,
        base_model=config.base_model_name_or_path,
        # What trains; model-level tensors (VeRA's frozen shared projections) count in the file size only.
        num_parameters=sum(t.numel() for k, t in tensors.items() if not cls.is_model_tensor(k)),
        file_bytes=(path / WEIGHTS_NAME).stat().st_size + (path / CONFIG_NAME).stat().st_size,
        dtypes=sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}), layers=layers, note=note,
        num_layers=len(parts),
    )


def inspect_mixture(path: str | os.PathLike, per_layer: bool = True) -> MixtureReport:
    """A saved mixture (lorakit.save_mixture's directory): its settings, its routers' sizes from the router file's
    header (no tensor read), and each expert inspected as an adapter; errors name the mixture, the expert, the file."""
    path = Path(path)
    config, data = mixture_config(path), read_mixture_config(path)
    routers = read_router_header(path)
    experts = {}
    for name, directory in config.experts.items():
        with naming_expert(path, name):
            experts[name] = inspect_adapter(directory, per_layer=per_layer)
    return MixtureReport(
        path=str(path), experts=experts, top_k=config.top_k, router=config.router, load_balance=config.load_balance,
        router_layers=len(routers), router_parameters=sum(math.prod(shape) for shape, _ in routers.values()),
        file_bytes=(path / MIXTURE_CONFIG).stat().st_size + (path / ROUTER_FILE).stat().st_size,
        task_type=data.get("task_type"), base_model=data.get("base_model_name_or_path"),
    )


def effective_rank(delta: torch.Tensor, energy: float = 0.9) -> int:
    """How many singular values hold `energy` of the squared Frobenius norm (0 for an all-zero update)."""
    s = torch.linalg.svdvals(delta.float())
    total = (s**2).sum()
    if total == 0:
        return 0
    cum = torch.cumsum(s**2, 0) / total
    return int((cum < energy).sum().item()) + 1


def _layer_report(module: str, delta: torch.Tensor, rank: int) -> LayerReport:
    return LayerReport(module, rank, effective_rank(delta), float(delta.norm()))


def _natural(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
