"""The ranks an optimizer talks to, and the uneven asynchronous all-to-all that moves pieces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class CommGroup:
    """The ranks one optimizer talks to. ``group`` is None for a single process."""

    group: Optional[dist.ProcessGroup]
    ranks: tuple[int, ...]  # global ranks, in group-rank order
    rank: int  # this process's position in ``ranks``

    @property
    def world(self) -> int:
        return len(self.ranks)


def resolve_comm_group(params: Sequence[torch.Tensor], process_group: Optional[dist.ProcessGroup]) -> CommGroup:
    """The union of the ranks of every parameter's mesh; ``process_group`` only for plain tensors."""
    meshes = {id(p.device_mesh): p.device_mesh for p in params if isinstance(p, DTensor)}
    plain = [p for p in params if not isinstance(p, DTensor)]
    if meshes and plain and process_group is not None:
        raise ValueError(
            "process_group is for plain (non-DTensor) replicated parameters only; this optimizer mixes DTensor "
            "and plain parameters: make them all DTensors on one set of ranks, or use two optimizers"
        )
    if process_group is not None:
        if not dist.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized")
        ranks = tuple(dist.get_process_group_ranks(process_group))
        return CommGroup(process_group if len(ranks) > 1 else None, ranks, ranks.index(dist.get_rank()))
    if not meshes:
        return CommGroup(None, (0,), 0)
    union = sorted({int(r) for mesh in meshes.values() for r in mesh.mesh.flatten().tolist()})
    me = dist.get_rank()
    if len(union) == 1:
        return CommGroup(None, tuple(union), 0)
    if union == list(range(dist.get_world_size())):
        group = dist.group.WORLD
    else:
        group = next(
            (m.get_group() for m in meshes.values() if m.ndim == 1 and sorted(m.mesh.tolist()) == union),
            None,
        ) or dist.new_group(union, use_local_synchronization=True)
    ranks = tuple(dist.get_process_group_ranks(group))
    return CommGroup(group, ranks, ranks.index(me))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor a DTensor wraps (``to_local()`` would dispatch a view op per call, per step)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def all_to_all(comm: CommGroup, send: torch.Tensor, recv: torch.Tensor, send_counts: Sequence[int],
               recv_counts: Sequence[int], moves: bool) -> Optional[dist.Work]:
    """Uneven all-to-all into ``recv``, asynchronous; returns the work to wait for (None: nothing moves).

    ``moves`` comes from the plan and is identical on every rank: when nothing crosses ranks in a
    bucket, no rank calls the collective.
    """
    if comm.group is None or not moves:
        return None
    return dist.all_to_all_single(recv, send, list(recv_counts), list(send_counts), group=comm.group, async_op=True)
