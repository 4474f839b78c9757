"""Newton–Schulz orthogonalization on local tensors (no torch.distributed here).

The engine runs NS in place on preallocated stacks (``newton_schulz_``): the input is
normalised in place, two iterates alternate through ``out=`` matmuls, and the Gram matrices
live in a reused workspace, so one call allocates nothing of the matrices' size.
``orthogonalize`` is the same arithmetic on a fresh copy, for users and references.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .schedules import Method, Schedule, resolve_schedule

AUTO = "auto"


def as_dtype(dtype) -> torch.dtype:
    """Accept a torch.dtype or its name ("bfloat16", "torch.float32", "fp32")."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = str(dtype).removeprefix("torch.")
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"ns_dtype must be \"auto\" or a floating torch dtype, got {dtype!r}")
    return resolved


def check_ns_dtype(dtype):
    """``"auto"`` or a floating torch dtype (names accepted), for a param group's ``ns_dtype``."""
    return AUTO if dtype == AUTO else as_dtype(dtype)


def resolve_ns_dtype(dtype, device) -> torch.dtype:
    """``"auto"`` is bfloat16 on CUDA and float32 elsewhere: CPUs without bf16 units run bf16
    matmuls about 10× slower than fp32, while on GPUs bf16 NS is the standard choice."""
    if dtype == AUTO:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return as_dtype(dtype)


@dataclass(frozen=True)
class NSKey:
    """What matrices must share to be orthogonalized in one batched call: compute dtype and schedule."""

    dtype: torch.dtype
    schedule: Schedule

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def gram_size(m: int, n: int) -> int:
    """Side of the Gram matrix NS forms for an m×n matrix (the smaller dimension)."""
    return min(m, n)


def normalize_(X: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Scale each matrix of X ([k, m, n]) in place so its spectral norm is at most ~1.

    The Frobenius norm is taken in fp32 at least; a zero matrix stays zero (eps keeps the factor finite).
    """
    dtype = torch.promote_types(X.dtype, torch.float32)
    factor = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=dtype)
    factor.mul_(schedule.norm_scale).add_(schedule.eps).reciprocal_()
    return X.mul_(factor)


def _use_triton(X: torch.Tensor) -> bool:
    if not X.is_cuda:
        return False
    from . import triton_kernels  # DIST_MUON_DISABLE_TRITON=1 keeps the torch path

    return triton_kernels.use_triton(X)


def newton_schulz_(X: torch.Tensor, Y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, schedule: Schedule,
                   scale: float = 1.0) -> torch.Tensor:
    """``scale · NS(X)`` for a stack X of shape [k, m, n], in place.

    X and Y are the two iterates (Y is scratch of X's shape); A and B are [k, s, s] Gram
    workspaces with s = min(m, n). Returns whichever of X and Y holds the result: X after an
    even number of steps, Y after an odd one. ``scale`` (the lr scale) is folded into the last
    step's coefficients, so it costs no extra pass.
    """
    return iterate_(normalize_(X, schedule), Y, A, B, schedule, scale)


def iterate_(X: torch.Tensor, Y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, schedule: Schedule,
             scale: float = 1.0) -> torch.Tensor:
    """The NS loop on a normalised stack X ([k, m, n]): X ← a·X + (b·G + c·G²)·X per step.

    Tall matrices are never transposed: their Gram matrix is XᵀX and the update X·B (B is
    symmetric), so every operand stays in place. Triton's symmetric kernels form the Gram
    matrices on CUDA.
    """
    tall = X.size(-2) > X.size(-1)
    triton = _use_triton(X)
    last = schedule.steps - 1
    for step, (a, b, c) in enumerate(schedule.coefficients):
        f = scale if step == last else 1.0
        wide = X.mT if tall else X
        if triton:
            from . import triton_kernels

            triton_kernels.sym_gram(wide, out=A)
            triton_kernels.sym_poly(A, b, c, out=B)
        else:
            torch.bmm(wide, wide.mT, out=A)
            torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
        if tall:
            torch.baddbmm(X, X, B, beta=a * f, alpha=f, out=Y)
        else:
            torch.baddbmm(X, B, X, beta=a * f, alpha=f, out=Y)
        X, Y = Y, X
    return X


def _workspace(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k, m, n = X.shape
    s = gram_size(m, n)
    A = X.new_empty(k, s, s)
    return torch.empty_like(X), A, torch.empty_like(A)


def normalize(X: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """``normalize_`` on a copy."""
    return normalize_(X.clone(), schedule)


def newton_schulz_iterations(X: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The NS loop on an already normalised X ([m, n] or [k, m, n]); X itself is not modified."""
    X3 = X.reshape(-1, *X.shape[-2:]).clone()
    return iterate_(X3, *_workspace(X3), schedule).reshape(X.shape)


def row_state_dtype(ns_dtype: torch.dtype) -> torch.dtype:
    """NorMuon's second moments: fp32, or the NS dtype when wider (they travel as NS-dtype elements)."""
    return ns_dtype if ns_dtype.itemsize > 4 else torch.float32


def normuon_rows_(O: torch.Tensor, v: torch.Tensor, weight, eps: float, scale: float = 1.0) -> torch.Tensor:
    """NorMuon's per-row normalisation (Li et al. 2025) of orthogonalized matrices, in place.

    O: [k, m, n] (any float dtype); v: [k, m, 1] fp32 second moments, updated in place:
    ``v ← lerp(v, mean_cols(O²), weight)`` with ``weight = 1 − beta2`` (a float, or a tensor
    broadcasting to v); then ``O ← O / (sqrt(v) + eps)``, rescaled to O's own Frobenius norm,
    times ``scale``. A zero matrix stays zero.
    """
    dtype = torch.promote_types(O.dtype, v.dtype)
    row_sq = torch.linalg.vector_norm(O, dim=-1, keepdim=True, dtype=dtype).square_()  # n·mean_cols(O²)
    v.lerp_(row_sq.div(O.size(-1)).to(v.dtype), weight)
    inv = v.sqrt().add_(eps).reciprocal_()
    before = row_sq.sum(dim=-2, keepdim=True)
    after = (row_sq * inv.square()).sum(dim=-2, keepdim=True).clamp_min_(torch.finfo(dtype).tiny)
    return O.mul_(inv.mul_(before.div_(after).sqrt_().mul_(scale)))


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def orthogonalize_stack(X: torch.Tensor, schedule: Schedule, *, scale: float = 1.0, compiled: bool = False) -> torch.Tensor:
    """``scale · NS(X)`` for X of shape [k, m, n] in its own dtype, allocating its own workspace.

    X is overwritten (normalised in place). ``compiled`` runs the loop under ``torch.compile``.
    """
    run = _compiled(newton_schulz_) if compiled else newton_schulz_
    return run(X, *_workspace(X), schedule, scale)


def orthogonalize_with(X: torch.Tensor, schedule: Schedule, dtype: torch.dtype, *, compiled: bool = False) -> torch.Tensor:
    """NS(X) for X of shape [..., m, n], computed in ``dtype``; returns ``dtype``."""
    if X.ndim < 2:
        raise ValueError(f"orthogonalize needs X of shape [..., m, n], got {tuple(X.shape)}")
    stack = X.to(dtype=dtype, copy=True).reshape(-1, *X.shape[-2:])
    return orthogonalize_stack(stack, schedule, compiled=compiled).reshape(X.shape)


def orthogonalize(
    X: torch.Tensor,
    *,
    method: Method = "polar_express",
    steps: int = 5,
    dtype=torch.bfloat16,
) -> torch.Tensor:
    """Approximate the orthogonal polar factor UVᵀ of every matrix in ``X`` ([..., m, n]).

    ``method`` is "quintic", "polar_express" or a list of (a, b, c) triples; the Gram matrix is
    formed on the smaller side; a zero matrix maps to zeros.
    """
    return orthogonalize_with(X, resolve_schedule(method, steps), as_dtype(dtype))
