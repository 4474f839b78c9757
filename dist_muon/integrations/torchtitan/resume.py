"""Checking a checkpoint against every DistMuon before torchtitan's CheckpointManager loads it
(both torchtitan versions: their ``dcp_load`` has the same signature and key layout)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch.nn as nn

import dist_muon as dm
from dist_muon import checkpoint as ckpt

# The live state as the trainer's checkpoint flattened it: (model part, its DistMuon) ->
# {"model": FQN -> tensor, "optim": flat optimizer keys}; None: torch's own flattening (0.2.2).
CurrentState = Optional[Callable[[nn.Module, dm.DistMuon], dict[str, Any]]]


def validate_before_loading(trainer, current: CurrentState = None) -> None:
    """Wrap ``trainer.checkpointer.dcp_load`` so a mismatched checkpoint stops the job before DCP
    writes anything.

    ``CheckpointManager.dcp_load`` hands the live state to ``dcp.load``, which writes the tensors in
    place; ``DistMuon.load_state_dict`` would object to a mismatch only afterwards. This runs
    ``dist_muon.checkpoint.checkpoint_problems`` first (DCP metadata and param-group entries only),
    so a mismatched checkpoint raises a CheckpointError naming the parameters and nothing is loaded.
    ``exclusive=False``: a pipeline stage sees the other stages' state too.
    """
    checkpointer, container = getattr(trainer, "checkpointer", None), getattr(trainer, "optimizers", None)
    pairs = [(part, opt) for part, opt in zip(trainer.model_parts, getattr(container, "optimizers", []))
             if isinstance(opt, dm.DistMuon)]
    if checkpointer is None or not getattr(checkpointer, "enable", True) or not pairs:
        return
    load = checkpointer.dcp_load

    def dcp_load(state_dict, checkpoint_id, from_hf, from_quantized):
        if not from_hf and "optimizer" in state_dict:  # a model-only load (step 0, HF weights) has no optimizer
            problems = [p for part, opt in pairs for p in ckpt.checkpoint_problems(
                checkpoint_id, part, opt, model_prefix="", optim_prefix="optimizer.", exclusive=False,
                current=None if current is None else current(part, opt))]
            if problems:
                raise ckpt.CheckpointError(
                    f"checkpoint {checkpoint_id} does not match this model/optimizer (nothing was loaded):\n  "
                    + "\n  ".join(problems[:20]))
        return load(state_dict, checkpoint_id, from_hf, from_quantized)

    checkpointer.dcp_load = dcp_load
