"""Numerics: Newton–Schulz schedules and kernels on local tensors. No torch.distributed here."""

from .newton_schulz import AUTO, as_dtype, check_ns_dtype, orthogonalize, orthogonalize_with, resolve_ns_dtype
from .schedules import NAMED_METHODS, POLAR_EXPRESS, QUINTIC, Schedule, resolve_schedule

__all__ = [
    "NAMED_METHODS",
    "POLAR_EXPRESS",
    "QUINTIC",
    "Schedule",
    "AUTO",
    "as_dtype",
    "check_ns_dtype",
    "resolve_ns_dtype",
    "orthogonalize",
    "orthogonalize_with",
    "resolve_schedule",
]
