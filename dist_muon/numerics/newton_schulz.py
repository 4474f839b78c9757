"""Newton–Schulz orthogonalization on local tensors (no torch.distributed here)."""

from __future__ import annotations

import functools

import torch

from .schedules import Method, Schedule, resolve_schedule



def as_dtype(dtype) -> torch.dtype:
    """Accept a torch.dtype or its name ("bfloat16", "torch.float32", "fp32")."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = str(dtype).removeprefix("torch.")
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"ns_dtype must be \"auto\" or a floating torch dtype, got {dtype!r}")
    return resolved


AUTO = "auto"


def check_ns_dtype(dtype):
    """``"auto"`` or a floating torch dtype (names accepted), for a param group's ``ns_dtype``."""
    return AUTO if dtype == AUTO else as_dtype(dtype)


def resolve_ns_dtype(dtype, device) -> torch.dtype:
    """``"auto"`` is bfloat16 on CUDA and float32 elsewhere: CPUs without bf16 units run bf16
    matmuls about 10× slower than fp32, while on GPUs bf16 NS is the standard choice."""
    if dtype == AUTO:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return as_dtype(dtype)


def normalize(X: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Scale each matrix so its spectral norm is at most ~1; the Frobenius norm is taken in fp32."""
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    return X * (1.0 / (norm * schedule.norm_scale + schedule.eps)).to(X.dtype)


def torch_iterations(X: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ, for wide X (rows ≤ cols)."""
    for a, b, c in schedule.coefficients:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.ndim == 3 else torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a) if X.ndim == 3 else torch.addmm(X, B, X, beta=a)
    return X


@functools.cache
def compiled_torch_iterations():
    """torch.compile of the torch loop, made once on first use (shapes are static per bucket)."""
    return torch.compile(torch_iterations, dynamic=False)


def newton_schulz_iterations(X: torch.Tensor, schedule: Schedule, *, compiled: bool = False) -> torch.Tensor:
    """The NS loop: symmetric Triton kernels on CUDA when available, else torch (optionally compiled)."""
    if X.is_cuda:  # symmetric Triton kernels; DIST_MUON_DISABLE_TRITON=1 keeps the torch path
        from . import triton_kernels

        if triton_kernels.use_triton(X):
            return triton_kernels.newton_schulz_iterations_triton(X, schedule.coefficients)
    return (compiled_torch_iterations() if compiled else torch_iterations)(X, schedule)


def orthogonalize_with(X: torch.Tensor, schedule: Schedule, dtype: torch.dtype, *, compiled: bool = False) -> torch.Tensor:
    """NS(X) for X of shape [..., m, n], computed in ``dtype``; returns ``dtype``."""
    if X.ndim < 2:
        raise ValueError(f"orthogonalize needs X of shape [..., m, n], got {tuple(X.shape)}")
    tall = X.size(-2) > X.size(-1)
    Y = X.to(dtype)
    if tall:
        Y = Y.mT
    batch_shape = Y.shape[:-2]
    Y = Y.reshape(-1, *Y.shape[-2:]) if Y.ndim != 3 else Y
    if Y.size(0) == 1:
        Y = Y[0]
    Y = newton_schulz_iterations(normalize(Y, schedule), schedule, compiled=compiled)
    Y = Y.reshape(*batch_shape, *Y.shape[-2:])
    return Y.mT if tall else Y


def orthogonalize(
    X: torch.Tensor,
    *,
    method: Method = "polar_express",
    steps: int = 5,
    dtype=torch.bfloat16,
) -> torch.Tensor:
    """Approximate the orthogonal polar factor UVᵀ of every matrix in ``X`` ([..., m, n]).

    ``method`` is "quintic", "polar_express" or a list of (a, b, c) triples; tall matrices
    are transposed so X·Xᵀ is the small Gram matrix; a zero matrix maps to zeros.
    """
    return orthogonalize_with(X, resolve_schedule(method, steps), as_dtype(dtype))
