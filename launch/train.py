"""Train with torchtitan's real Trainer and the DistMuon optimizer plugin.

The installed torchtitan decides what the arguments are:

torchtitan 0.2.x (TOML)::

    torchrun --nproc_per_node N -m launch.train --job.config_file CONFIG.toml [--section.field value ...]

* ``[optimizer] name = "DistMuon"`` selects DistMuon (any other name falls
  through to torchtitan's own optimizers); every ``[optimizer]`` field can be
  overridden as ``--optimizer.<field>``. See docs/torchtitan.md.
* Without a GPU the run switches to CPU + gloo through ``launch/cpu_shims.py``
  (never when CUDA is available).

torchtitan 0.3.x (Python config registries; the arguments are torchtitan.train's own)::

    torchrun --nproc_per_node N -m launch.train --module MODULE --config CONFIG [--section.field value ...]

* ``--module`` is a torchtitan model (``llama3``) or a dotted path to a module with a
  ``config_registry`` (``dist_muon.integrations.torchtitan``); ``--config`` names a function there.
* Without a GPU the run switches to CPU + gloo through ``launch/cpu_shims_030.py``
  (never when CUDA is available).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
from pathlib import Path

from launch import cpu_shims, cpu_shims_030


def run(trainer_cls, config) -> None:
    """torchtitan.train.main's body, taking an already parsed config.

    We cannot call ``torchtitan.train.main`` itself: its ConfigManager reads
    ``sys.argv[1:]`` captured as a default argument at import time, so we could
    not add our config module to the arguments.
    """
    import torch
    from torchtitan.tools.logging import logger

    from dist_muon.integrations.torchtitan.resume import validate_before_loading

    def build():
        trainer = trainer_cls(config)
        validate_before_loading(trainer)
        return trainer

    if config.comm.mode == "local_tensor":
        logger.info("Local tensor mode enabled - skipping training execution")
        return
    train_and_close(build, config)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train_and_close(build, config) -> None:
    """Build the trainer, then train it or write a seed checkpoint, as torchtitan's entry does; close it.

    After a failure there is no ``destroy_process_group`` (as in torchtitan: it can hang on NCCL).
    After success the trainer is freed before the caller destroys the process group: what holds the
    group (model, optimizers, meshes), left to interpreter teardown, can abort a finished gloo rank.
    """
    trainer = None
    try:
        trainer = build()
        if config.checkpoint.create_seed_checkpoint:
            if int(os.environ["WORLD_SIZE"]) != 1 or not config.checkpoint.enable:
                raise ValueError("a seed checkpoint needs WORLD_SIZE=1 and checkpoint.enable")
            trainer.checkpointer.save(curr_step=0, last_step=True)
            from torchtitan.tools.logging import logger

            logger.info("Created seed checkpoint")
        else:
            trainer.train()
    except Exception:
        if trainer is not None:
            trainer.close()
        raise
    trainer.close()
    del trainer
    gc.collect()


def parse_config(argv: list[str]):
    """torchtitan's JobConfig from TOML + CLI, with DistMuon's [optimizer] fields, validated.

    Bad settings fail here, before any process group, model or data exists.
    """
    from torchtitan.config import ConfigManager

    from dist_muon.integrations import torchtitan as dm_titan

    config = ConfigManager().parse_args(dm_titan.add_config_module(argv))
    if config.optimizer.name == dm_titan.NAME:
        dm_titan.validate(config.optimizer)
    return config


def torchtitan_version() -> tuple[int, int, int]:
    """``dist_muon.integrations.torchtitan.version.require_supported()``, without importing that package.

    The package's ``__init__`` imports torchtitan's Trainer, and modules imported before the CPU
    shims are active keep a "cuda" ``device_type`` copied at import. version.py imports nothing
    but importlib, so it is loaded from its file on its own.
    """
    path = Path(__file__).resolve().parents[1] / "dist_muon" / "integrations" / "torchtitan" / "version.py"
    spec = importlib.util.spec_from_file_location("_dist_muon_torchtitan_version", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.require_supported()


def run_030(argv: list[str]) -> None:
    """torchtitan 0.3.x: ``torchtitan.train.main``'s body, parsing ``argv`` instead of ``sys.argv``.

    The same steps and log lines as torchtitan's own entry, plus freeing the trainer before
    ``destroy_process_group`` (the gloo teardown issue ``run`` describes).
    """
    import torch
    import torchtitan
    from torchtitan.config import ConfigManager
    from torchtitan.observability import structured_logger as sl
    from torchtitan.tools.logging import init_logger, logger

    init_logger()
    logger.info("torchtitan version: %s (0.0.0 means __version__ is not defined correctly).", torchtitan.__version__)
    if cpu_shims_030.active_shims():
        logger.info(f"No CUDA device: running on CPU/gloo with shims {cpu_shims_030.active_shims()}")
    config = ConfigManager().parse_args(argv)
    # "training" is the source name torchtitan's own entry uses (internal tooling relies on it).
    sl.init_structured_logger(source="training", output_dir=config.dump_folder,
                              enable=config.debug.enable_structured_logging)
    sl.log_trace_instant("structured_logger_started")
    if config.comm.mode == "local_tensor":
        logger.info("Local tensor mode enabled - skipping training execution")
        return
    train_and_close(config.build, config)
    if torch.distributed.is_initialized():
        with sl.log_trace_span("torch_distributed_teardown"):
            torch.distributed.destroy_process_group()
    logger.info("Process group destroyed")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if torchtitan_version()[:2] == (0, 3):
        if cpu_shims_030.cpu_shims_needed():
            cpu_shims_030.activate()
        run_030(argv)
        return
    if cpu_shims.cpu_shims_needed():
        cpu_shims.activate()

    from torchtitan.tools.logging import init_logger, logger

    from dist_muon.integrations.torchtitan import DistMuonTrainer

    init_logger()
    if cpu_shims.active_shims():
        logger.info(f"No CUDA device: running on CPU/gloo with shims {cpu_shims.active_shims()}")
    run(DistMuonTrainer, parse_config(argv))


if __name__ == "__main__":
    main()
