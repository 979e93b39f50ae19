"""PiSSA and OLoRA: LoRA whose A and B start from W0's own principal directions, the base keeping the residual.

    PiSSA (Meng et al. 2024):  W0 = U S Vᵀ;  A0 = √(S_r/s) V_rᵀ,  B0 = U_r √(S_r/s)      (SVD; "pissa_niter_N": randomised)
    OLoRA (Büyükakyüz 2024):   W0 = Q R;     A0 = R_r,            B0 = Q_r               (QR)
    base weight ← W0 − s·B0·A0,  so  W_res + s·B·A = W0 at the start and training moves the principal part.

Exactly PEFT's definitions, so A, B and the residual equal PEFT's. Because the base now holds a residual,
the adapter answers for the part it took: it adds s·B0·A0 back whenever it is not running (a disabled
model, another adapter), returns it when removed, and by default saves the equivalent plain LoRA for the
untouched base, ΔW = s·(B·A − B0·A0) = s·[B | −B0]·[A ; A0] (rank 2r, PEFT's conversion).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..fused import fused_linear
from ..layers import LayerType, LoraAdapter


def is_residual_init(init: str) -> bool:
    return init in ("pissa", "olora") or init.startswith("pissa_niter_")


@torch.no_grad()
def initial_factors(weight: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) for a weight laid out (out, in), computed in fp32, as PEFT computes them."""
    w = weight.float()
    if init == "olora":
        Q, R = torch.linalg.qr(w)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:  # pissa_niter_N: a randomised SVD, N subspace iterations (fast for large layers, not deterministic)
        U, S, V = torch.svd_lowrank(w, q=r, niter=int(init.rsplit("_", 1)[1]))
        Vh = V.T
    root = torch.sqrt(S / scale)
    return (root[:, None] * Vh).contiguous(), (U * root[None, :]).contiguous()


class ResidualInitAdapter(LoraAdapter):
    """Plain LoRA started from W0's principal part (PiSSA) or its QR factors (OLoRA); holds that part of W0."""

    @classmethod
    def create(cls, config, base: nn.Module, ltype: LayerType, name: str, shared=None) -> "ResidualInitAdapter":
        if ltype.name not in ("linear", "conv1d"):
            raise ConfigError(f"init={config.init!r} factorises a weight matrix; {name!r} is a {type(base).__name__} "
                              "(PiSSA/OLoRA apply to Linear and GPT-2 Conv1D layers): exclude it or use init='kaiming'")
        if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ConfigError(f"init={config.init!r} needs a float weight; {name!r} holds {base.weight.dtype} "
                              "(initialise on the unquantised base, then quantise the residual)")
        adapter = super().create(config, base, ltype, name, shared)
        weight = _out_in(base.weight, ltype)
        A0, B0 = initial_factors(weight, adapter.rank, adapter.scale, config.init)
        with torch.no_grad():
            adapter.lora_A.copy_(A0)
            adapter.lora_B.copy_(B0)
        # The starting factors, frozen: they describe the part of W0 the base no longer holds.
        adapter.register_buffer("init_A", adapter.lora_A.detach().clone())
        adapter.register_buffer("init_B", adapter.lora_B.detach().clone())
        return adapter

    holds_base_part = True

    def attach(self, layer) -> None:
        self._move_base_part(layer, -1.0)

    def detach(self, layer) -> None:
        self._move_base_part(layer, +1.0)

    @torch.no_grad()
    def _move_base_part(self, layer, sign: float) -> None:
        w = layer.base_layer.weight
        part = layer.type.to_layout(layer.base_layer, (self.init_B.float() @ self.init_A.float()) * self.scale)
        w.copy_((w.float() + sign * part.to(w.device)).to(w.dtype))

    def base_part(self, layer, x: torch.Tensor) -> torch.Tensor:
        A0 = self.init_A
        return layer.type.low_rank(layer.base_layer, x.to(A0.dtype), A0, self.init_B) * self.scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The change to the untouched base: s·(B·A − B0·A0) = s·[B | −B0]·[A ; A0]."""
        return torch.cat([self.lora_A, self.init_A]), torch.cat([self.lora_B, -self.init_B], dim=1)

    def fast_forward(self, layer, x: torch.Tensor, strength: float) -> torch.Tensor | None:
        """Alone at full strength: W_res·x + s·B·A·dropout(x), the form PEFT trains (dropout never touches the
        frozen part, and nothing cancels numerically)."""
        if strength != 1.0:
            return None
        A, B = self.lora_A, self.lora_B
        if self.can_fuse(layer, x):
            base = layer.base_layer
            return fused_linear(x, base.weight, base.bias, A, B, self.scale, layer.type.fan_in_fan_out)
        y = layer.base_layer(x)
        return y + (layer.type.low_rank(layer.base_layer, self.dropout(x.to(A.dtype)), A, B) * self.scale).to(y.dtype)

    def merge_into(self, layer, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        A, B = self.lora_A.float(), self.lora_B.float()
        if strength == 1.0:  # W_res + s·B·A: what the adapted model computes, without the B0·A0 round trip
            return weight + layer.type.to_layout(layer.base_layer, (B @ A) * self.scale).to(weight.device)
        A0, B0 = self.init_A.float(), self.init_B.float()
        mixed = (B @ A) * strength + (B0 @ A0) * (1.0 - strength)
        return weight + layer.type.to_layout(layer.base_layer, mixed * self.scale).to(weight.device)

    def peft_tensors(self, layer) -> dict[str, torch.Tensor]:
        """The plain LoRA for the untouched base: [A ; A0] and [B | −B0]."""
        name_A, name_B = layer.type.factor_names
        A, B = self.factors()
        return {name_A: A, name_B: B}

    def residual_tensors(self, layer) -> dict[str, torch.Tensor]:
        """A and B as they are: PEFT's own PiSSA/OLoRA files, for a base that recomputes the residual on load."""
        return super().peft_tensors(layer)

    def load_targets(self, layer) -> dict[str, torch.Tensor]:
        # Only a residual-form file (init_lora_weights "pissa"/"olora") builds this adapter; its A and B are ours.
        return self.residual_tensors(layer)

    @classmethod
    def saved_config(cls, config):
        """The untouched-base form is a plain LoRA of twice the rank at the same scale (PEFT's conversion)."""
        grow = math.sqrt(2.0) if config.rslora else 2.0  # scale α/r or α/√r stays the same at rank 2r
        return config.replace(
            r=2 * config.r, alpha=config.alpha * grow, init="kaiming",
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: v * grow for k, v in config.alpha_pattern.items()},
        )


def _out_in(weight: torch.Tensor, ltype: LayerType) -> torch.Tensor:
    return weight.T if ltype.fan_in_fan_out else weight
