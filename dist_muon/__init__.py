"""dist_muon: a DTensor/FSDP2-native distributed Muon optimizer."""

from . import qk_clip
from .numerics import orthogonalize
from .optimizer import DistMuon, RankDisagreement, StepStats
from .routing import build_param_groups, canonical_fqn, routing_report
from .views import build_view, lr_scale

__all__ = [
    "DistMuon",
    "RankDisagreement",
    "StepStats",
    "build_param_groups",
    "build_view",
    "canonical_fqn",
    "lr_scale",
    "orthogonalize",
    "qk_clip",
    "routing_report",
]
__version__ = "0.1.0"
