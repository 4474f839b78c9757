"""Numerics: Newton–Schulz schedules and kernels on local tensors. No torch.distributed here."""

from .newton_schulz import (
    AUTO,
    NSKey,
    as_dtype,
    check_ns_dtype,
    newton_schulz_,
    normuon_rows_,
    orthogonalize,
    orthogonalize_with,
    resolve_ns_dtype,
    row_state_dtype,
)
from .schedules import NAMED_METHODS, POLAR_EXPRESS, QUINTIC, Schedule, resolve_schedule

__all__ = [
    "NAMED_METHODS",
    "POLAR_EXPRESS",
    "QUINTIC",
    "Schedule",
    "AUTO",
    "NSKey",
    "as_dtype",
    "check_ns_dtype",
    "resolve_ns_dtype",
    "newton_schulz_",
    "normuon_rows_",
    "orthogonalize",
    "orthogonalize_with",
    "resolve_schedule",
    "row_state_dtype",
]
