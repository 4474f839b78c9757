"""Registering DistMuon in torchtitan train specs, and the Trainer that does it."""

from __future__ import annotations

import dataclasses

from torchtitan.protocols import train_spec as tt_train_spec
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from .builder import wrap_build_lr_schedulers, wrap_build_optimizers
from .reporting import group_lrs, qk_clip_summary, step_stats
from .config import CONFIG_MODULE, NAME

_CONFIG_MODULE_FLAGS = ("--job.custom_config_module", "--job.custom-config-module")


def with_dist_muon(spec: tt_train_spec.TrainSpec) -> tt_train_spec.TrainSpec:
    """A copy of ``spec`` whose optimizer / LR-scheduler builders understand ``name = "DistMuon"``."""
    if getattr(spec.build_optimizers_fn, "dist_muon_wrapped", False):
        return spec
    return dataclasses.replace(
        spec,
        build_optimizers_fn=wrap_build_optimizers(spec.build_optimizers_fn),
        build_lr_schedulers_fn=wrap_build_lr_schedulers(spec.build_lr_schedulers_fn),
    )


def register(model_name: str) -> None:
    """Make ``get_train_spec(model_name)`` return the DistMuon-enabled spec.

    torchtitan gives user-registered specs priority over its built-in ones, so we
    register the wrapped copy under the same name. A spec someone else already
    registered under that name is wrapped in place.
    """
    spec = tt_train_spec.get_train_spec(model_name)
    wrapped = with_dist_muon(spec)
    if wrapped is spec:
        return
    try:
        tt_train_spec.register_train_spec(model_name, wrapped)
    except ValueError:  # already user-registered: patch that spec object itself
        spec.build_optimizers_fn = wrapped.build_optimizers_fn
        spec.build_lr_schedulers_fn = wrapped.build_lr_schedulers_fn


def register_all() -> None:
    """Register every model torchtitan ships (for ``--experimental.custom_import``)."""
    from torchtitan.models import _supported_models

    for name in sorted(_supported_models):
        try:
            register(name)
        except ImportError as e:  # a model whose optional dependencies are missing
            logger.warning(f"DistMuon: not registering {name}: {e}")


class DistMuonTrainer(Trainer):
    """torchtitan's Trainer with DistMuon registered for the configured model."""

    def __init__(self, job_config) -> None:
        register(job_config.model.name)
        super().__init__(job_config)

    def train_step(self, data_iterator):
        log = self.metrics_processor.should_log(self.step)
        if log:  # torchtitan logs only the first group's lr; DistMuon's groups differ
            logger.info(f"step {self.step:3d}  group lrs: {group_lrs(self.optimizers)}")
        super().train_step(data_iterator)
        if log and (stats := step_stats(self.optimizers)):
            logger.info(f"step {self.step:3d}  DistMuon: {stats}")
        if log and (clip := qk_clip_summary(self.optimizers, self.parallel_dims,
                                            _qk_clip_on(self.job_config.optimizer))):
            logger.info(f"step {self.step:3d}  {clip}")


def _qk_clip_on(cfg) -> bool:
    return cfg.name == NAME and getattr(cfg, "qk_clip_threshold", None) is not None


def add_config_module(argv: list[str]) -> list[str]:
    """Add ``--job.custom_config_module`` for DistMuon's fields unless the user chose one."""
    if any(arg.split("=", 1)[0] in _CONFIG_MODULE_FLAGS for arg in argv):
        return argv
    if _toml_config_module(argv):
        return argv
    return [*argv, "--job.custom_config_module", CONFIG_MODULE]


def _toml_config_module(argv: list[str]) -> str | None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10, as in torchtitan
        import tomli as tomllib

    path = None
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in ("--job.config_file", "--job.config-file"):
            path = value or (argv[i + 1] if i + 1 < len(argv) else None)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f).get("job", {}).get("custom_config_module") or None
    except (OSError, tomllib.TOMLDecodeError):
        return None  # torchtitan reports an unreadable config file itself

