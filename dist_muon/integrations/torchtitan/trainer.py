"""torchtitan 0.3.0: the Trainer our config registry builds.

It is torchtitan's Trainer plus two things DistMuon users need: a checkpoint is checked against
every DistMuon before anything is loaded (``resume.validate_before_loading``), and each logged step
reports every param group's lr and what this rank's DistMuon did (NS FLOPs and time, traffic).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torchtitan.components.optimizer.utils import get_flat_optim_state_dict
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from .layouts import check_backend
from .options import check_qk_clip_parallelism
from .reporting import group_lrs, qk_clip_summary, step_stats
from .resume import validate_before_loading


class DistMuonTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        """torchtitan's Trainer.Config; ``optimizer`` is normally a ``DistMuonContainer.Config``."""

        def __post_init__(self) -> None:
            Trainer.Config.__post_init__(self)  # (zero-argument super() fails in a slots dataclass)
            check_backend(self.parallelism.spmd_backend, int(os.environ.get("WORLD_SIZE", "1")))
            check_qk_clip_parallelism(self.optimizer, _Degrees(self.parallelism), context_parallel=False)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        validate_before_loading(self, current=_flat_state)

    def train_step(self, data_iterator) -> None:
        log = self.metrics_processor.should_log(self.step)
        if log:  # torchtitan logs lrs per optimizer index; these name each DistMuon group's algorithm
            logger.info(f"step {self.step:3d}  group lrs: {group_lrs(self.optimizers)}")
        super().train_step(data_iterator)
        if log and (stats := step_stats(self.optimizers)):
            logger.info(f"step {self.step:3d}  DistMuon: {stats}")
        if log and (clip := qk_clip_summary(self.optimizers, self.parallel_dims,
                                            getattr(self.config.optimizer, "qk_clip_threshold", None) is not None)):
            logger.info(f"step {self.step:3d}  {clip}")


@dataclass(frozen=True)
class _Degrees:
    """The parallel degrees ``check_qk_clip_parallelism`` reads, from the config (at parse time,
    before any ParallelDims exists)."""

    parallelism: object

    @property
    def cp_enabled(self) -> bool:
        return self.parallelism.context_parallel_degree > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return False  # 0.3.0's DDP parameters are DTensors (Replicate): every replica clips alike

    @property
    def fsdp_enabled(self) -> bool:
        return True


def _flat_state(part, optimizer) -> dict:
    """The live state as torchtitan 0.3.0's CheckpointManager flattens it."""
    return {"model": part.state_dict(), "optim": get_flat_optim_state_dict(optimizer)}
