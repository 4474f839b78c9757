"""Copies of a DistMuon (``copy.deepcopy``, pickle) and what ``__setstate__`` does for torch.optim.

torch.optim's ``__getstate__`` keeps ``defaults``, ``state`` and ``param_groups``; DistMuon's own
settings ride along as one ``Settings`` record. A copy

* keeps every setting (``Settings``) and the last step's statistics;
* rebuilds its plan, schedules, runner, workspace and CUDA graph from its own parameters, locally
  (no collective): nothing that a step writes into is shared with the original;
* talks to the same ranks. A deepcopy shares the original's process group (a process group cannot be
  copied, and the copy's parameters live on the same ranks). A pickle carries the ranks only; the
  unpickled optimizer finds its group again without a collective: none for one process, the default
  group when it spans every rank, else the group of one of its parameters' 1-D device meshes. An
  optimizer over another subset of ranks (``process_group=`` a subgroup, or DTensors whose union of
  meshes no 1-D mesh covers) refuses to be pickled, on every rank, naming what to do instead;
* has no hooks: as in torch.optim, step and state-dict hooks stay with the original.

A distributed optimizer's copy steps like the original only when every rank makes the copy and
steps it (its step's collectives are the original's); a copy made or stepped on some ranks only
waits in a collective until the process group's timeout, as the original would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .. import comm
from .pipeline import StepStats

SETTINGS_KEY = "_dist_muon_settings"
# Attributes made from the parameters and settings, never copied (see ``restore``).
REBUILT = ("_comm", "_device", "_graphed", "_plan", "_plan_key", "_digest_cache", "_rows_specs", "_agreement",
           "_plan_digest", "_runner", "_rows_views", "_muown_updates", "_scratch", "_local_rows",
           "qk_clip", "_qk_maxima")


class SharedRanks:
    """The optimizer's ranks: the same object in a deepcopy, the rank list in a pickle."""

    def __init__(self, group: comm.CommGroup, unpicklable: Optional[str]):
        self.group, self.unpicklable = group, unpicklable

    def __deepcopy__(self, memo) -> "SharedRanks":
        return self

    def __reduce__(self):
        if self.unpicklable:
            raise TypeError(self.unpicklable)
        return (PortableRanks, (self.group.ranks,))


@dataclass(frozen=True)
class PortableRanks:
    """The global ranks of a pickled optimizer, in group-rank order."""

    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Settings:
    """What a DistMuon is beyond torch.optim's ``defaults``, ``state`` and ``param_groups``."""

    group_defaults: dict
    nonfinite_grad: str
    owner_policy: str
    bucket_bytes: int
    compile_ns: bool
    cuda_graph: bool
    qk_clip_threshold: Optional[float]
    qk_clip_alpha: float
    qk_clip_heads: tuple  # qk_clip.AttentionHeads, by parameter name
    last_step_stats: Optional[StepStats]
    ranks: Any  # SharedRanks, or PortableRanks once unpickled


def settings_state(opt) -> dict:
    """The extra ``__getstate__`` entry."""
    params = _params(opt)
    group = opt._comm
    unpicklable = None
    if group.group is not None and _group_of(params, group.ranks) is None:
        unpicklable = (
            f"this DistMuon talks to ranks {list(group.ranks)} through a process group that an unpickled copy "
            "could not find again without a collective (process_group= a subgroup, or parameters on several "
            "meshes): copy.deepcopy(optimizer) works (the copy shares the group); or save optimizer.state_dict() "
            "and load it into a new DistMuon built on the same ranks"
        )
    return {SETTINGS_KEY: Settings(
        group_defaults=dict(opt._group_defaults), nonfinite_grad=opt.nonfinite_grad, owner_policy=opt.owner_policy,
        bucket_bytes=opt.bucket_bytes, compile_ns=opt.compile_ns, cuda_graph=opt.cuda_graph,
        qk_clip_threshold=opt.qk_clip_threshold, qk_clip_alpha=opt.qk_clip_alpha,
        qk_clip_heads=opt.qk_clip.heads if opt.qk_clip is not None else (),
        last_step_stats=opt.last_step_stats, ranks=SharedRanks(group, unpicklable),
    )}


def pop_settings(state: dict) -> Optional[Settings]:
    """The settings of a copy; None when torch.optim's ``load_state_dict`` calls ``__setstate__``."""
    return state.pop(SETTINGS_KEY, None)


def restore(opt, settings: Settings) -> None:
    """Finish a copy: its settings, its ranks, and everything a step uses rebuilt from its own parameters."""
    opt._group_defaults = dict(settings.group_defaults)
    opt.nonfinite_grad, opt.owner_policy = settings.nonfinite_grad, settings.owner_policy
    opt.bucket_bytes, opt.compile_ns, opt.cuda_graph = settings.bucket_bytes, settings.compile_ns, settings.cuda_graph
    opt.last_step_stats = settings.last_step_stats
    params = _params(opt)
    ranks = settings.ranks
    opt._comm = ranks.group if isinstance(ranks, SharedRanks) else _find_again(params, ranks.ranks)
    opt._device = comm.local_tensor(params[0]).device
    opt._scratch = opt._new_scratch()
    opt.qk_clip_threshold, opt.qk_clip_alpha = settings.qk_clip_threshold, settings.qk_clip_alpha
    opt.qk_clip, opt._qk_maxima = opt._new_qk_clip(settings.qk_clip_heads), None
    opt._graphed, opt._plan, opt._plan_key, opt._digest_cache = None, None, None, (None, None)
    opt._warned_capturable_if_run_uncaptured = True  # what torch.optim.Optimizer.__init__ sets
    opt._ensure_plan()


def finish_setstate(opt, settings: Optional[Settings]) -> None:
    """After torch.optim's ``__setstate__`` (a copy, or ``load_state_dict`` with ``settings`` None)."""
    # torch adds differentiable=False for its own optimizers; DistMuon has no such mode, and the key
    # would reach every group added later (and their checkpoints) on copies and loaded optimizers only
    if opt.defaults.get("differentiable") is False:
        del opt.defaults["differentiable"]
    # older state (torch.optim's format before steps were tensors: a Python number): float32 tensors,
    # as torch's Adam makes them on load
    for state in opt.state.values():
        if "step" in state and not isinstance(state["step"], torch.Tensor):
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
    if settings is not None:
        restore(opt, settings)


def _params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _group_of(params, ranks: tuple[int, ...]) -> Optional[dist.ProcessGroup]:
    """A process group over exactly ``ranks`` (in that order) that exists without a collective."""
    if not dist.is_initialized():
        return None
    if ranks == tuple(range(dist.get_world_size())):
        return dist.group.WORLD
    for p in params:
        if isinstance(p, DTensor) and p.device_mesh.ndim == 1:
            group = p.device_mesh.get_group()
            if tuple(dist.get_process_group_ranks(group)) == ranks:
                return group
    return None


def _find_again(params, ranks: tuple[int, ...]) -> comm.CommGroup:
    if len(ranks) == 1:
        return comm.CommGroup(None, ranks, 0)
    if not dist.is_initialized() or dist.get_rank() not in ranks:
        raise RuntimeError(
            f"an unpickled DistMuon talks to ranks {list(ranks)}: unpickle it on those ranks of a job with "
            "torch.distributed initialized, or save optimizer.state_dict() and load it into a new DistMuon"
        )
    group = _group_of(params, ranks)
    if group is None:
        raise RuntimeError(f"an unpickled DistMuon found no process group over ranks {list(ranks)} (the job has "
                           f"{dist.get_world_size()} ranks); build a new DistMuon and load_state_dict instead")
    return comm.CommGroup(group, ranks, ranks.index(dist.get_rank()))
