"""The SVD arithmetic behind combine, resize, extract and the spectrum: factorise B·A without forming it.

For ΔW = B·A with B (out×r) and A (r×in), two thin QR factorisations reduce the SVD to an r×r matrix:
B = Q_B R_B, Aᵀ = Q_A R_A  ⇒  ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ = (Q_B U) S (Q_A V)ᵀ. That costs O((out+in)·r²) instead of
the O(out·in·min(out, in)) of an SVD of the full matrix, and gives the same singular values and subspaces.
"""

from __future__ import annotations

import torch


def svd_of_product(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) with B·A = U·diag(S)·Vh, S descending, for B (out×r) and A (r×in) in fp32 (or fp64)."""
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)
    return Q_B @ U, S, Vh @ Q_A.T


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(matrix, full_matrices=False)


def split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-k approximation as factors (A, B) = (√S_k·Vh_k, U_k·√S_k): B·A = U_k S_k Vh_k."""
    root = torch.sqrt(S[:k])
    return (root[:, None] * Vh[:k]).contiguous(), (U[:, :k] * root[None, :]).contiguous()


def energy_kept(S: torch.Tensor) -> torch.Tensor:
    """energy_kept(S)[k-1]: the share of ‖ΔW‖²_F the best rank-k approximation keeps (1 for an all-zero ΔW)."""
    e = S.double() ** 2
    total = e.sum()
    if total == 0:
        return torch.ones_like(e)
    return torch.cumsum(e, 0) / total


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The smallest k ≥ 1 whose best rank-k approximation keeps at least `energy` of ‖ΔW‖²_F."""
    kept = energy_kept(S)
    return max(1, min(len(S), int((kept < energy - 1e-12).sum().item()) + 1))


def relative_error(S: torch.Tensor, k: int) -> float:
    """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F for the best rank-k approximation ΔW_k."""
    e = S.double() ** 2
    total = e.sum()
    return float(torch.sqrt(e[k:].sum() / total)) if total > 0 else 0.0
