"""Each layer's singular-value spectrum of ΔW: the share of ‖ΔW‖² a rank-k re-factorisation keeps, k = 1, 2, 4, …,
as a table and a PNG (the "rank ablation via SVD energy": how much of its rank an adapter really uses)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..files import atomic_write
from ..io import read_adapter_config, read_adapter_tensors, split_factor_key
from ..variants import adapter_class
from . import lowrank


def layer_spectra(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{layer: singular values of its ΔW, descending}, from an adapter directory (no base model needed)."""
    config = read_adapter_config(path)
    cls = adapter_class(config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in read_adapter_tensors(path).items():
        found = split_factor_key(key)
        if found:
            parts.setdefault(found[0], {})[found[1]] = value
    spectra = {}
    for module, by_token in sorted(parts.items(), key=lambda item: _natural(item[0])):
        A = by_token.get("lora_A", by_token.get("lora_embedding_A"))
        B = by_token.get("lora_B", by_token.get("lora_embedding_B"))
        if getattr(cls, "low_rank_delta", False) and A is not None and B is not None and len(by_token) == 2:
            S = lowrank.svd_of_product(B.float().flatten(1) * config.scale_for(module), A.float().flatten(1))[1]
        else:  # another method: the full ΔW
            S = torch.linalg.svdvals(cls.delta_from_file(by_token, config, module).float())
        spectra[module] = S[: config.rank_for(module)]
    return spectra


def ranks_to_show(r: int) -> list[int]:
    ks, k = [], 1
    while k < r:
        ks.append(k)
        k *= 2
    return ks + [r]


def format_spectrum(spectra: dict[str, torch.Tensor]) -> str:
    r = max(len(S) for S in spectra.values())
    ks = ranks_to_show(r)
    width = max(len(m) for m in spectra)
    lines = [f"{'energy kept at rank k':{width}s}  " + "  ".join(f"{'k=' + str(k):>7s}" for k in ks)]
    for module, S in spectra.items():
        kept = lowrank.energy_kept(S)
        cells = [f"{kept[min(k, len(S)) - 1].item():7.1%}" for k in ks]
        lines.append(f"{module:{width}s}  " + "  ".join(cells))
    mean = torch.stack([lowrank.energy_kept(_pad(S, r)) for S in spectra.values()]).mean(0)
    lines.append(f"{'mean over layers':{width}s}  " + "  ".join(f"{mean[k - 1].item():7.1%}" for k in ks))
    return "\n".join(lines)


def plot_spectrum(spectra: dict[str, torch.Tensor], path: str | os.PathLike, title: str = "") -> Path | None:
    """Energy kept vs rank, one thin line per layer (coloured by projection) and the mean; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    r = max(len(S) for S in spectra.values())
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    kinds = sorted({m.rsplit(".", 1)[-1] for m in spectra})
    colours = dict(zip(kinds, plt.cm.tab10.colors))
    for module, S in spectra.items():
        kind = module.rsplit(".", 1)[-1]
        ax.plot(range(1, len(S) + 1), lowrank.energy_kept(S).numpy(), color=colours[kind], alpha=0.35, linewidth=0.8)
    for kind in kinds:
        ax.plot([], [], color=colours[kind], label=kind)
    mean = torch.stack([lowrank.energy_kept(_pad(S, r)) for S in spectra.values()]).mean(0)
    ax.plot(range(1, r + 1), mean.numpy(), color="black", linewidth=2.2, label="mean over layers")
    ax.set_xlabel("rank k of the re-factorised ΔW")
    ax.set_ylabel("share of ‖ΔW‖² kept")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(1, r)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or f"singular-value energy of {len(spectra)} layers")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


def _pad(S: torch.Tensor, r: int) -> torch.Tensor:
    """A layer of smaller rank keeps everything from its own rank on."""
    return torch.cat([S, S.new_zeros(r - len(S))]) if len(S) < r else S


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
