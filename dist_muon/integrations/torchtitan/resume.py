"""Checking a checkpoint against every DistMuon before torchtitan's CheckpointManager loads it, and
warm starts from checkpoints routed otherwise (both torchtitan versions: their ``dcp_load`` has the
same signature and key layout: model FQNs at the top level, flat FQN-keyed optimizer state under
``optimizer.``)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch.nn as nn

import dist_muon as dm
from dist_muon import checkpoint as ck
from dist_muon import warm_start

# The live state as the trainer's checkpoint flattened it: (model part, its DistMuon) ->
# {"model": FQN -> tensor, "optim": flat optimizer keys}; None: torch's own flattening (0.2.2).
CurrentState = Optional[Callable[[nn.Module, dm.DistMuon], dict[str, Any]]]
OPTIM_PREFIX = "optimizer."
HOW = "the optimizer option on_routing_change = \"reset\" or \"convert\""


def validate_before_loading(trainer, current: CurrentState = None, log: Callable[[str], None] = None) -> None:
    """Wrap ``trainer.checkpointer.dcp_load`` so a mismatched checkpoint stops the job before DCP
    writes anything, and a checkpoint routed otherwise loads as the optimizer option
    ``on_routing_change`` says.

    ``CheckpointManager.dcp_load`` hands the live state to ``dcp.load``, which writes the tensors in
    place; ``DistMuon.load_state_dict`` would object to a mismatch only afterwards. This plans the
    load first (``dist_muon.warm_start.plan_warm_start``: DCP metadata and param-group entries only),
    so a mismatched checkpoint raises a CheckpointError naming the parameters and nothing is loaded.
    ``exclusive=False``: a pipeline stage sees the other stages' state too.

    When some parameter's algorithm changed (``"reset"`` / ``"convert"``, on any rank), everything
    but the optimizers loads through torchtitan's own ``dcp_load``, then each DistMuon as its plan
    says; the LR schedulers reload their position last, so each group's lr comes from the
    ``initial_lr`` it has now. The report goes to ``log`` on rank 0 (torchtitan's logger) and
    ``trainer.optimizers.last_warm_start`` (one report per model part).
    """
    checkpointer, container = getattr(trainer, "checkpointer", None), getattr(trainer, "optimizers", None)
    pairs = [(part, opt) for part, opt in zip(trainer.model_parts, getattr(container, "optimizers", []))
             if isinstance(opt, dm.DistMuon)]
    if checkpointer is None or not getattr(checkpointer, "enable", True) or not pairs:
        return
    mode = warm_start.check_mode(getattr(container, "on_routing_change", "refuse"))
    load = checkpointer.dcp_load

    def dcp_load(state_dict, checkpoint_id, from_hf, from_quantized):
        if from_hf or "optimizer" not in state_dict:  # a model-only load (step 0, HF weights) has no optimizer
            return load(state_dict, checkpoint_id, from_hf, from_quantized)
        source = warm_start.dcp_source(checkpoint_id)
        plans = [warm_start.plan_warm_start(source, part, opt, mode=mode, model_prefix="", optim_prefix=OPTIM_PREFIX,
                                            exclusive=False, current=None if current is None else current(part, opt))
                 for part, opt in pairs]
        problems = [p for plan in plans for p in plan.problems]
        if problems:
            raise ck.CheckpointError(
                f"checkpoint {checkpoint_id} does not match this model/optimizer (nothing was loaded):\n  "
                + "\n  ".join(problems[:20]) + ck.routing_hint(problems, HOW))
        if not warm_start.any_rank(any(plan.moves for plan in plans)):
            return load(state_dict, checkpoint_id, from_hf, from_quantized)
        load({k: v for k, v in state_dict.items() if k != "optimizer"}, checkpoint_id, from_hf, from_quantized)
        reports = [warm_start.apply_warm_start(plan, part, opt) for plan, (part, opt) in zip(plans, pairs)]
        schedulers = state_dict.get("lr_scheduler")
        if schedulers is not None:  # their position was loaded above, before the groups' initial_lr
            schedulers.load_state_dict(schedulers.state_dict())
        container.last_warm_start = reports
        if ck._rank() == 0 and any(r.count("kept") < len(r.rows) for r in reports):
            for report in reports:
                (log or _torchtitan_log)(str(report))

    checkpointer.dcp_load = dcp_load


def _torchtitan_log(text: str) -> None:
    from torchtitan.tools.logging import logger

    logger.info(text)
