"""Building DistMuon through torchtitan's optimizer and LR-scheduler builders."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch.nn as nn
from torchtitan.components import optimizer as tt_optimizer
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.tools.logging import logger

from .config import NAME, distmuon_kwargs, validate
from .options import check_qk_clip_parallelism
from .routing import distmuon_per_part


class DistMuonOptimizersContainer(OptimizersContainer):
    """One ``dist_muon.DistMuon`` per model part (pipeline stage), in torchtitan's container.

    The inherited state_dict / load_state_dict go through DCP's flattened
    optimizer state dict, so checkpoints reshard like torchtitan's AdamW ones.
    """

    def __init__(self, model_parts: list[nn.Module], optimizer_config) -> None:
        validate(optimizer_config)
        kwargs = distmuon_kwargs(optimizer_config)
        self.model_parts = model_parts
        self.optimizers, all_params = distmuon_per_part(model_parts, optimizer_config, kwargs, logger.info)
        self.on_routing_change = optimizer_config.on_routing_change  # read by resume.validate_before_loading
        self._validate_length(len(model_parts))
        # Optimizer.__init__ on the container wires up torch's step hooks (used by the MoE hook).
        self._post_init(all_params, kwargs)


@contextlib.contextmanager
def _swapped(module, name: str, value):
    """Temporarily rebind ``module.name`` (restored even if the call raises)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def build_dist_muon_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager=None):
    """Same signature as ``torchtitan.components.optimizer.build_optimizers``."""
    if ft_manager is not None and ft_manager.enabled:
        raise NotImplementedError("DistMuon does not support torchft fault tolerance yet")
    check_qk_clip_parallelism(optimizer_config, parallel_dims, context_parallel=True)
    return DistMuonOptimizersContainer(model_parts, optimizer_config)


def wrap_build_optimizers(original):
    """A train spec's ``build_optimizers_fn`` that builds DistMuon when ``name = "DistMuon"``.

    Other names go to ``original`` untouched. Wrappers around torchtitan's
    ``build_optimizers`` (e.g. ``build_optimizers_with_moe_load_balancing``, which
    registers the MoE expert-bias update as an optimizer step pre-hook) are kept:
    they look ``build_optimizers`` up in torchtitan's optimizer module at call
    time, so we point that name at our builder for the duration of the call.
    """

    def build(model_parts, optimizer_config, parallel_dims, ft_manager=None):
        if optimizer_config.name != NAME:
            return original(model_parts, optimizer_config, parallel_dims, ft_manager=ft_manager)
        if original is tt_optimizer.build_optimizers:
            return build_dist_muon_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
        with _swapped(tt_optimizer, "build_optimizers", build_dist_muon_optimizers):
            return original(model_parts, optimizer_config, parallel_dims, ft_manager=ft_manager)

    build.__wrapped__ = original
    build.dist_muon_wrapped = True
    return build


class PerGroupLRSchedulersContainer(LRSchedulersContainer):
    """torchtitan's LR schedulers, resumed so that every param group keeps its own lr.

    torchtitan 0.2.2 saves ``schedulers[0].state_dict()`` (of rank 0) and loads it
    into every scheduler. That state holds ``base_lrs`` / ``_last_lr``: one lr per
    param group of the FIRST optimizer. DistMuon's groups have different lrs
    (Muon ``lr`` vs ``adamw_lr`` vs per-rule overrides) and, with pipeline
    parallelism, different stages have different groups, so copying those lists
    gives groups the wrong base lr (or crashes on a length mismatch).

    We save only the schedule position, which is the same for every scheduler,
    and on load rebuild each group's base lr from its own ``initial_lr`` (restored
    per parameter, by FQN, with the optimizer state) and recompute its lr.
    """

    POSITION_KEYS = ("last_epoch", "_step_count")

    def __init__(self, inner: LRSchedulersContainer) -> None:
        self.schedulers = inner.schedulers

    def state_dict(self) -> dict[str, Any]:
        state = self.schedulers[0].state_dict()
        return {k: copy.deepcopy(state[k]) for k in self.POSITION_KEYS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            for key in self.POSITION_KEYS:
                setattr(scheduler, key, state_dict[key])
            _rebase(scheduler)


def _rebase(scheduler) -> None:
    """Set each group's lr to its own ``initial_lr`` x the schedule factor at ``last_epoch``."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [group["initial_lr"] for group in groups]
    for group, base, lr_lambda in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def wrap_build_lr_schedulers(original):
    """A train spec's ``build_lr_schedulers_fn`` that resumes DistMuon groups with their own lrs."""

    def build(optimizers, lr_scheduler_config, training_steps):
        schedulers = original(optimizers, lr_scheduler_config, training_steps)
        if isinstance(optimizers, DistMuonOptimizersContainer):
            return PerGroupLRSchedulersContainer(schedulers)
        return schedulers

    build.__wrapped__ = original
    build.dist_muon_wrapped = True
    return build
