"""torchtitan 0.3.0: DistMuon as an ``OptimizersContainer`` whose typed ``Config`` carries every
DistMuon option (``--optimizer.<field>`` on the command line).

Put it in a config (``config.optimizer = DistMuonContainer.Config(lr=0.02, adamw_lr=4e-3)``), or
into any stock config with the ``@override`` in ``override.py``. Per model part (one per pipeline
stage) it routes the parameters itself (``routing.param_groups``: no per-FQN layout to write) and
builds one ``dm.DistMuon``; layouts are read from the parameters' DTensor placements.

Checkpoints stay torchtitan's: flat, FQN-keyed (``components/optimizer/utils.py``), resharded by DCP.
Two things are added on load: a checkpoint written before a param-group key existed still loads
(the key keeps its configured value, logged), and every rank reports the same error if the
checkpoint's routing differs (``DistMuon.load_state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer.utils import init_optim_state, load_flat_optim_state_dict
from torchtitan.distributed.utils import get_spmd_backend
from torchtitan.tools.logging import logger

from .layouts import check_parameter_layouts
from .options import DistMuonFields, check_betas, check_number, distmuon_kwargs, fail, validate_fields
from .routing import distmuon_per_part, is_rank0

# Implementation modes of torchtitan's own optimizers that mean nothing to DistMuon (which has its
# own vectorised step) and are accepted silently; the stock configs set "fused".
_IGNORED_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")


class DistMuonContainer(OptimizersContainer):
    """One ``dm.DistMuon`` per model part, in torchtitan 0.3.0's optimizer container."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config, DistMuonFields):
        """DistMuon's options (see ``options.DistMuonFields``) plus the four that torchtitan 0.2.2's
        ``[optimizer]`` section had built in. ``param_groups`` stays empty: DistMuon routes the
        parameters itself; use ``rules`` to change what goes where."""

        lr: float = 0.02
        """Muon lr (and the default of every group)."""

        weight_decay: float = 0.0
        """Decoupled weight decay of the Muon groups (p ← p·(1 − lr·wd)); AdamW's default too."""

        adamw_betas: tuple[float, float] = (0.9, 0.95)
        """AdamW's (beta1, beta2) for the AdamW-routed parameters."""

        adamw_eps: float = 1e-8
        """AdamW's eps for the AdamW-routed parameters."""

        def __post_init__(self) -> None:
            validate(self)  # at parse time: a bad value fails before any process group starts

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        validate(config)
        kwargs = distmuon_kwargs(config, adamw_betas=config.adamw_betas, adamw_eps=config.adamw_eps)
        self.model_parts = model_parts
        self.optimizers, all_params = distmuon_per_part(
            model_parts, config, kwargs, logger.info,
            check_part=lambda part: check_parameter_layouts(part, get_spmd_backend()))
        self.on_routing_change = config.on_routing_change  # read by resume.validate_before_loading
        self._validate_params(all_params)
        self._post_init(all_params)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optim in self.optimizers:
            init_optim_state(optim)
            load_flat_optim_state_dict(optim, with_missing_group_keys(optim, state_dict))


def validate(cfg) -> None:
    """Every field, with the messages of the 0.2.2 ``[optimizer]`` section; raises ConfigError."""
    validate_fields(cfg)
    check_betas(cfg, "adamw_betas")
    check_number(cfg, "adamw_eps", 0)
    if cfg.param_groups:
        fail("param_groups", "DistMuon routes the parameters itself (matrices to Muon, embeddings, the output "
                             "head and vectors to AdamW); express exceptions as rules, e.g. "
                             "rules=[{'pattern': 'router', 'algorithm': 'adamw', 'lr': 1e-3}]")
    if cfg.optimizer_factory_kwargs_by_name:
        fail("optimizer_factory_kwargs_by_name", "DistMuon takes no factory arguments; set its fields directly")
    if cfg.implementation not in _IGNORED_IMPLEMENTATIONS:
        hint = ("; for bf16 optimizer state set state_dtype=\"bfloat16\" instead (Muon momentum and AdamW moments)"
                if cfg.implementation == "fused_opt_states_bf16" else "")
        fail("implementation", f"{cfg.implementation!r} is an option of torchtitan's Adam/AdamW, not DistMuon's; "
                               f"use one of {list(_IGNORED_IMPLEMENTATIONS)} (ignored by DistMuon){hint}")


def with_missing_group_keys(optim: torch.optim.Optimizer, flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` plus, for every param-group key the checkpoint predates, the live group's value.

    torchtitan's loader requires every live group key in the checkpoint; an option added after the
    checkpoint was written (a view key such as ``interleave``) would make old checkpoints unloadable.
    """
    missing = {}
    for group in optim.param_groups:
        names = group.get("param_names") or []
        if not names:
            continue
        for key, value in group.items():
            flat_key = f"param_groups.{names[0]}.{key}"
            if key not in ("params", "param_names") and flat_key not in flat:
                missing[flat_key] = value
    if missing and is_rank0():
        logger.warning(f"DistMuon: the checkpoint predates {sorted({k.rsplit('.', 1)[1] for k in missing})}; "
                       "those param-group keys keep their configured values")
    return {**flat, **missing}
