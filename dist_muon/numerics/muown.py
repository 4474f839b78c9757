"""Muown's weight-norm reparameterisation, as pure tensor functions (DTensor-friendly).

W = g ⊙ v / ‖v‖_row: per-row magnitude g (updated by Adam) and direction v (updated by
orthogonalized momentum), recomposed every step. Formulation of Lion et al., "Muown:
Row-Norm Control for Muon Optimization" (arXiv 2605.10797). Row norms are clamped so a
zero row gives a zero row, never NaN.
"""

from __future__ import annotations

import torch

NORM_FLOOR = 1e-12


def row_norms(W: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.linalg.vector_norm(W, dim=dims, keepdim=True).clamp_min(NORM_FLOOR)


def away_from_zero(g: torch.Tensor) -> torch.Tensor:
    """g with |g| ≥ NORM_FLOOR, sign kept, so W / g stays finite."""
    return torch.where(g < 0, g.clamp(max=-NORM_FLOOR), g.clamp(min=NORM_FLOOR))


def decompose(W: torch.Tensor, grad: torch.Tensor, g: torch.Tensor, v_norm: torch.Tensor, dims: tuple[int, ...]):
    """Direction v and the chain-rule gradients of g and v, from W = g · v / ‖v‖.

    u = W / g is O(1) per element (W's rows have norm |g|), so it is formed first.
    """
    u = W / away_from_zero(g)
    v = u * v_norm
    grad_g = (grad * u).sum(dim=dims, keepdim=True)
    grad_v = (g / v_norm) * (grad - u * grad_g)
    return v, grad_g, grad_v


def adam_direction(grad_g, exp_avg, exp_avg_sq, step: int, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Adam's bias-corrected step direction for the magnitudes; updates the moments in place."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad_g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad_g, grad_g, value=1 - beta2)
    return (exp_avg / (1 - beta1**step)) / ((exp_avg_sq / (1 - beta2**step)).sqrt() + eps)


def recompose(g: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """W = g · v / ‖v‖_row, and the new ‖v‖_row."""
    v_norm = row_norms(v, dims)
    return g * (v / v_norm), v_norm
