"""Train with torchtitan's real Trainer and the DistMuon optimizer plugin.

    torchrun --nproc_per_node N -m launch.train --job.config_file CONFIG.toml [--section.field value ...]

* ``[optimizer] name = "DistMuon"`` selects DistMuon (any other name falls
  through to torchtitan's own optimizers); every ``[optimizer]`` field can be
  overridden as ``--optimizer.<field>``. See docs/torchtitan.md.
* Without a GPU the run switches to CPU + gloo through ``launch/cpu_shims.py``
  (never when CUDA is available).
"""

from __future__ import annotations

import gc
import os
import sys

from launch import cpu_shims


def run(trainer_cls, config) -> None:
    """torchtitan.train.main's body, taking an already parsed config.

    We cannot call ``torchtitan.train.main`` itself: its ConfigManager reads
    ``sys.argv[1:]`` captured as a default argument at import time, so we could
    not add our config module to the arguments.
    """
    import torch
    from torchtitan.tools.logging import logger

    trainer = None
    try:
        trainer = trainer_cls(config)
        validate_before_loading(trainer)
        if config.comm.mode == "local_tensor":
            logger.info("Local tensor mode enabled - skipping training execution")
            return
        if config.checkpoint.create_seed_checkpoint:
            if int(os.environ["WORLD_SIZE"]) != 1 or not config.checkpoint.enable:
                raise ValueError("a seed checkpoint needs WORLD_SIZE=1 and checkpoint.enable")
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info("Created seed checkpoint")
        else:
            trainer.train()
    except Exception:
        if trainer is not None:
            trainer.close()
        raise  # as torchtitan: no destroy_process_group after a failure (it can hang on NCCL)
    trainer.close()
    # Free what holds the process group (model, optimizers, meshes) while it is alive, then destroy it:
    # left to interpreter teardown, a gloo group can abort a finished rank.
    del trainer
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def validate_before_loading(trainer) -> None:
    """Check a checkpoint against every DistMuon before torchtitan's CheckpointManager loads it.

    ``CheckpointManager.dcp_load`` hands the live state to ``dcp.load``, which writes the tensors in
    place; ``DistMuon.load_state_dict`` would object to a mismatch only afterwards. This runs
    ``dist_muon.checkpoint.checkpoint_problems`` first (DCP metadata and param-group entries only),
    so a mismatched checkpoint stops the job with a CheckpointError naming the parameters and
    nothing is loaded. ``exclusive=False``: a pipeline stage sees the other stages' state too.
    """
    import dist_muon as dm
    from dist_muon import checkpoint as ckpt

    checkpointer, container = getattr(trainer, "checkpointer", None), getattr(trainer, "optimizers", None)
    pairs = [(part, opt) for part, opt in zip(trainer.model_parts, getattr(container, "optimizers", []))
             if isinstance(opt, dm.DistMuon)]
    if checkpointer is None or not pairs:
        return
    load = checkpointer.dcp_load

    def dcp_load(state_dict, checkpoint_id, from_hf, from_quantized):
        if not from_hf and "optimizer" in state_dict:  # a model-only load (step 0, HF weights) has no optimizer
            problems = [p for part, opt in pairs for p in ckpt.checkpoint_problems(
                checkpoint_id, part, opt, model_prefix="", optim_prefix="optimizer.", exclusive=False)]
            if problems:
                raise ckpt.CheckpointError(
                    f"checkpoint {checkpoint_id} does not match this model/optimizer (nothing was loaded):\n  "
                    + "\n  ".join(problems[:20]))
        return load(state_dict, checkpoint_id, from_hf, from_quantized)

    checkpointer.dcp_load = dcp_load


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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
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
