"""DistMuon: state, momentum, the AdamW path and step orchestration."""

from .core import DEFAULT_BUCKET_BYTES, DistMuon, RankDisagreement
from .pipeline import StepStats

__all__ = ["DEFAULT_BUCKET_BYTES", "DistMuon", "RankDisagreement", "StepStats"]
