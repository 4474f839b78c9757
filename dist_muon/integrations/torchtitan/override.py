"""torchtitan 0.3.0: DistMuon in ANY stock config, through torchtitan's ``@override`` hook.

    torchrun ... -m torchtitan.train --module llama3 --config llama3_8b \\
        --override.imports 'dist_muon.integrations.torchtitan.override.dist_muon={"lr": 0.02}'

The stock optimizer config (``OptimizersContainer.Config``: AdamW param groups) becomes a
``DistMuonContainer.Config``. Matrices go to Muon with the given options; the AdamW-routed
parameters (embeddings, the output head, norms, biases) keep the stock catch-all AdamW group's
lr, betas, eps and weight decay unless the options set ``adamw_*``. Other stock param groups are
not carried over (they are patterns for torchtitan's optimizers): say what you need as ``rules``.
Overrides run inside the Trainer, after the command line is parsed, so options come as the
override's JSON kwargs, not as ``--optimizer.<field>``; they are validated with the same messages.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config.override import override
from torchtitan.tools.logging import logger

from .container import DistMuonContainer
from .options import ConfigError

_ADAMW_KWARGS = {"lr": "adamw_lr", "betas": "adamw_betas", "eps": "adamw_eps", "weight_decay": "adamw_weight_decay"}


@override(target=OptimizersContainer.Config, exact=True, description="DistMuon: Muon for matrices, AdamW for the rest")
def dist_muon(stock: OptimizersContainer.Config, **options: Any) -> DistMuonContainer.Config:
    known = {f.name for f in fields(DistMuonContainer.Config)} - {f.name for f in fields(OptimizersContainer.Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"[optimizer] {unknown[0]}: not a DistMuon option; known options are {sorted(known)}")
    adamw = _catch_all_adamw(stock)
    inherited = {field: adamw[key] for key, field in _ADAMW_KWARGS.items() if key in adamw and field not in options}
    if "adamw_betas" in inherited:
        inherited["adamw_betas"] = tuple(inherited["adamw_betas"])
    dropped = [g.pattern for g in stock.param_groups if g is not _catch_all_group(stock)]
    if dropped:
        logger.warning(f"DistMuon override: stock param groups {dropped} are not carried over; "
                       "express what they did as DistMuon rules")
    return DistMuonContainer.Config(**inherited, **options)


def _catch_all_group(stock: OptimizersContainer.Config):
    """The group every parameter no other pattern claims falls into (``.*``), else the last AdamW one."""
    adamw = [g for g in stock.param_groups if g.optimizer_name in ("AdamW", "Adam")]
    return next((g for g in adamw if g.pattern in (".*", "")), adamw[-1] if adamw else None)


def _catch_all_adamw(stock: OptimizersContainer.Config) -> dict[str, Any]:
    group = _catch_all_group(stock)
    return dict(group.optimizer_kwargs) if group is not None else {}
