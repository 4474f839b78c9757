"""Moving pieces to their owners and results back: packing, uneven all-to-all, unpacking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .plan import Slices, slices_numel, slices_shape


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
    return t.to_local() if isinstance(t, DTensor) else t


def as_slices(s: Slices) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in s)


def pack(
    per_peer: Sequence[Sequence], counts: Sequence[int], source: Callable[[object], torch.Tensor],
    dtype: torch.dtype, device,
) -> torch.Tensor:
    """Concatenate, peer by peer, the pieces ``source(piece)`` into one flat buffer of ``dtype``."""
    flat = torch.empty(sum(counts), dtype=dtype, device=device)
    offset = 0
    for pieces in per_peer:
        for piece in pieces:
            n = slices_numel(piece[1])
            flat[offset : offset + n].view(slices_shape(piece[1])).copy_(source(piece))
            offset += n
    return flat


def unpack(flat: torch.Tensor, per_peer: Sequence[Sequence], sink: Callable[[object, torch.Tensor], None]) -> None:
    """Hand every piece of ``flat`` (laid out as ``pack`` wrote it) to ``sink(piece, values)``."""
    offset = 0
    for pieces in per_peer:
        for piece in pieces:
            n = slices_numel(piece[1])
            sink(piece, flat[offset : offset + n].view(slices_shape(piece[1])))
            offset += n


@dataclass
class Exchange:
    """An all-to-all in flight: ``wait()`` returns the received flat buffer."""

    recv: torch.Tensor
    work: Optional[object]

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.recv


def all_to_all(
    comm: CommGroup, send: torch.Tensor, send_counts: list[int], recv_counts: list[int], moves: bool
) -> Exchange:
    """Uneven all-to-all, asynchronous. ``moves`` comes from the plan (identical on every rank):
    when nothing crosses ranks in this bucket, no rank calls the collective."""
    recv = torch.empty(sum(recv_counts), dtype=send.dtype, device=send.device)
    if comm.group is None or not moves:
        return Exchange(recv, None)
    work = dist.all_to_all_single(recv, send, recv_counts, send_counts, group=comm.group, async_op=True)
    return Exchange(recv, work)
