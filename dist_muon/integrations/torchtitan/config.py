"""The ``[optimizer]`` fields DistMuon adds to torchtitan's JobConfig, and their validation.

torchtitan 0.2.2 extends its JobConfig through ``job.custom_config_module``: the
module's ``JobConfig`` dataclass is merged field by field into torchtitan's, so
``[optimizer]`` keeps torchtitan's fields (name, lr, beta1, beta2, eps,
weight_decay, ...) and gains the ones below. ``launch/train.py`` adds
``--job.custom_config_module dist_muon.integrations.torchtitan.config`` itself;
with torchtitan's own entry point pass it explicitly. Every field is then
settable in TOML and overridable as ``--optimizer.<field>``.

torchtitan rejects unknown ``[optimizer]`` keys while parsing; TOML values are
not type-checked there, so ``validate`` checks every field DistMuon uses and
raises ``ConfigError`` naming the field.
"""

# No `from __future__ import annotations`: torchtitan merges these dataclasses with
# make_dataclass and tyro must resolve the field types at runtime.
from dataclasses import dataclass, field
from typing import Any

from torchtitan.config import Optimizer as TorchtitanOptimizer

from .options import (  # noqa: F401 - parse_rules and ConfigError are part of this module's API
    NAME,
    ConfigError,
    DistMuonFields,
    check_number,
    fail,
    parse_rules,
    validate_fields,
)
from .options import distmuon_kwargs as _distmuon_kwargs

CONFIG_MODULE = __name__


@dataclass
class DistMuonOptimizer(TorchtitanOptimizer, DistMuonFields):
    """torchtitan's ``[optimizer]`` plus DistMuon's fields (used when ``name = "DistMuon"``).

    Mapping onto ``dist_muon.DistMuon``: ``lr`` and ``weight_decay`` are the Muon
    lr / decoupled weight decay; ``beta1``, ``beta2``, ``eps`` are AdamW's betas /
    eps (``adamw_betas``, ``adamw_eps``); every other DistMuon argument has a
    field of the same name (``options.DistMuonFields``). ``implementation`` is ignored by DistMuon.
    """


@dataclass
class JobConfig:
    """``job.custom_config_module`` entry point: merged into torchtitan's JobConfig."""

    optimizer: DistMuonOptimizer = field(default_factory=DistMuonOptimizer)


def validate(cfg) -> None:
    """Check every field DistMuon uses; raises ConfigError naming the first bad field."""
    if not hasattr(cfg, "rules"):
        raise ConfigError(
            f'[optimizer] name = "{NAME}" needs DistMuon\'s config fields: run through launch/train.py or pass '
            f"--job.custom_config_module {CONFIG_MODULE} (a custom config module must extend its JobConfig)"
        )
    validate_fields(cfg)
    check_number(cfg, "eps", 0)
    for name in ("beta1", "beta2"):
        check_number(cfg, name, 0, 1, high_open=True)
    if cfg.early_step_in_backward:
        fail("early_step_in_backward", "DistMuon steps all matrices together; it cannot step inside backward")


def distmuon_kwargs(cfg) -> dict[str, Any]:
    """Keyword arguments for ``dist_muon.DistMuon`` (everything but the param groups)."""
    return _distmuon_kwargs(cfg, adamw_betas=(cfg.beta1, cfg.beta2), adamw_eps=cfg.eps)
