"""Numerics: Newton–Schulz schedules and kernels on local tensors. No torch.distributed here."""

from .newton_schulz import as_dtype, orthogonalize, orthogonalize_with
from .schedules import NAMED_METHODS, POLAR_EXPRESS, QUINTIC, Schedule, resolve_schedule

__all__ = [
    "NAMED_METHODS",
    "POLAR_EXPRESS",
    "QUINTIC",
    "Schedule",
    "as_dtype",
    "orthogonalize",
    "orthogonalize_with",
    "resolve_schedule",
]
