"""The regularised least squares of the closed-form edit, on fc2 keys K (rows: token positions) and wanted changes R:
solved on the complement of an exactly protected span (orthonormal basis Q, complement Z), so that ΔW Q = 0.

    ΔW = R (P K_c)ᵀ (P K_c K_cᵀ P + λ_p P K_p K_pᵀ P + μ I)⁻¹,   P = I − Q Qᵀ

The system is block-diagonal on range(P) ⊕ range(Q) and the right-hand side lies in range(P), so the solution does
too: working in Z's coordinates (when span(Q) is large) gives the same ΔW in fewer flops.
"""

from __future__ import annotations

import torch

# a concept whose target needs more than this fraction of the hidden width (90 % of the energy) is refused
MAX_RANK_FRACTION = 0.75
# the exactly protected prompts' span leaves less than this fraction of the concept's activation energy
MIN_FREE_ENERGY = 1e-7


def orth_basis(K: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal bases, float64, of the column span of K (d, N) — singular values above rtol · σ_max — and, when
    K has more than d / 4 columns, of its orthogonal complement (else None: projecting rows is then cheaper)."""
    d, n = K.shape
    if n == 0:
        return torch.zeros(d, 0, dtype=torch.float64), None
    if 2 * n <= d:  # few columns: an SVD is cheap and the most accurate
        U, S, _ = torch.linalg.svd(K.double(), full_matrices=4 * n > d)
    else:  # d × d Gram eigenproblem
        evals, U = torch.linalg.eigh(K.double() @ K.double().T)
        order = evals.argsort(descending=True)
        S, U = evals[order].clamp_min(0).sqrt(), U[:, order]
    k = int((S > rtol * S[0]).sum()) if S[0] > 0 else 0
    return U[:, :k], (U[:, k:] if U.shape[1] == d and 4 * n > d else None)


def free_rows(K: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor | None) -> torch.Tensor:
    """K's rows with their span(Q) part removed, float32 row by row (float32 Grams of projected rows stay PSD; a
    float32 Gram projected afterwards does not when span(Q) holds most of the energy). Given the complement basis Z,
    the rows come in its coordinates (d − k columns): the same Gram in fewer flops when span(Q) is large."""
    if Z is not None:
        return K @ Z.float()
    Qf = Q.float()
    return K - (K @ Qf) @ Qf.T


def check_target(Kc, Kc_free, Rm, bearing) -> tuple[float, int]:
    """Refuse an edit the exact span leaves no room for, or a target wider than the hidden state allows."""
    free = float((Kc_free[bearing] ** 2).sum() / (Kc[bearing] ** 2).sum().clamp_min(1e-30))
    if free < MIN_FREE_ENERGY:
        raise ValueError(f"the exactly protected prompts cover the concept: only {free:.2e} of the concept "
                         "activations' energy lies outside their span; protect fewer or less related prompts")
    sv = torch.linalg.svdvals(Rm[bearing].double())  # effective dimension of the wanted change vs the hidden width
    energy = (sv**2).cumsum(0) / (sv**2).sum().clamp_min(1e-30)
    eff_rank = int((energy < 0.9).sum()) + 1
    if eff_rank > MAX_RANK_FRACTION * Rm.shape[1]:
        raise ValueError(
            f"the concept prompts span too large a subspace: the change needs {eff_rank} of {Rm.shape[1]} "
            f"dimensions for 90 % of its energy (cap {MAX_RANK_FRACTION:.0%}); erase narrower concepts one at a time")
    return free, eff_rank


def solve(Kc, Kc_free, Kp, Rm, bearing, Q, Z, protect_weight, ridge) -> tuple[torch.Tensor, float, float]:
    """Soft protection + ridge on the complement of the exact span (the system is block-diagonal in
    range(P) ⊕ range(Q) and the right-hand side lies in range(P), so the solution does too):

        ΔW = R (P K_c)ᵀ (P (K_c K_cᵀ + λ_p K_p K_pᵀ) P + μ I)⁻¹

    λ_p is per protected token relative to a concept token (protect_weight · #concept / #protected rows); μ = ridge ·
    the mean eigenvalue of P K_c K_cᵀ P. One Cholesky factorisation at the fc2-input width (or, in the complement's
    coordinates, at its width: the same solution). Returns ΔW (float64), μ, λ_p."""
    d_in = Kc.shape[-1]
    G = Kc_free.T @ Kc_free
    mu = ridge * float(torch.diagonal(G).sum()) / d_in
    lam = 0.0
    if len(Kp) and protect_weight > 0:
        lam = protect_weight * Kc.shape[0] / Kp.shape[0]
        Kp_free = free_rows(Kp, Q, Z)
        G += lam * (Kp_free.T @ Kp_free)
    G = G.double() + mu * torch.eye(G.shape[0], dtype=torch.float64)
    rhs = (Kc_free[bearing].T @ Rm[bearing]).double()  # (in, out); the prefix rows' target is 0
    delta = torch.cholesky_solve(rhs, torch.linalg.cholesky(G)).T
    if Z is not None:
        delta = delta @ Z.T  # back from the complement's coordinates
    return delta - (delta @ Q) @ Q.T, mu, lam  # exact annihilation of the protected span (removes round-off)


@torch.no_grad()
def fit_stats(unit, Kc, Rm, bearing, Kp, K_x) -> dict:
    """How far the concept tokens get toward the target at α = 1 (relative residual), and how much the protected
    tokens' fc2 output moves."""
    err = ((Kc @ unit.T - Rm)[bearing] ** 2).sum() / (Rm[bearing] ** 2).sum().clamp_min(1e-30)
    stats = {"target_residual": float(err.sqrt())}
    if len(Kp):  # soft-protected tokens' change, relative to the concept's wanted change
        rms_p = (Kp @ unit.T).pow(2).sum(-1).mean().sqrt()
        stats["soft_protected_rel_change"] = float(rms_p / Rm[bearing].pow(2).sum(-1).mean().sqrt())
    if len(K_x):
        stats["exact_protected_max_abs_change_fc2_out"] = float((K_x @ unit.T).abs().max())
    return stats
