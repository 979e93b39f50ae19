"""Look inside an adapter directory: rank, α, targets, sizes, and how much of its rank each layer really uses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

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

    def format(self) -> str:
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
