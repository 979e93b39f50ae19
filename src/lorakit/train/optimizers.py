"""`--optim`: torch's AdamW, or bitsandbytes' 8-bit AdamW (its two moment estimates in 8 bits with block-wise scales:
about 2 bytes per trained parameter instead of 8), optionally paged (CUDA unified memory moves the states to the
CPU when the GPU runs short)."""

from __future__ import annotations

import torch

from ..quant import require_bitsandbytes


def build_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float, device: torch.device,
                    say=print) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    bnb = require_bitsandbytes(f"--optim {name}")
    if name == "paged_adamw8bit" and device.type != "cuda":
        say(f"--optim paged_adamw8bit: paging moves optimizer states between GPU and CPU memory, and this run is on "
            f"{device.type}, where there is nothing to page; using adamw8bit (the same update, unpaged)")
        name = "adamw8bit"
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    # The same betas and eps as torch's AdamW; weight decay passed explicitly (bitsandbytes' default is 0.01).
    return cls(groups, lr=lr, weight_decay=weight_decay)
