"""DTensor placements → which rank holds which box of each parameter, by torch's own split rules.

A *layout* says which global indices each rank of the optimizer's communication group holds
along every tensor dim. For a DTensor it is derived from its mesh and placements with torch's
own ``_split_tensor`` (so Shard, uneven and empty shards and ``_StridedShard`` all follow
torch); a plain tensor is either single-process or replicated on every rank (DDP style).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

class Run(NamedTuple):
    """A contiguous stretch along one tensor dim: local index ``local`` holds global index ``start``."""

    local: int
    start: int
    length: int


DimRuns = tuple[tuple[Run, ...], ...]  # per tensor dim, the stretches a rank holds


@dataclass(frozen=True)
class Layout:
    """Which global indices each rank of the communication group holds, per tensor dim.

    ``runs[r]`` is None when rank ``r`` holds nothing; ``replica_key[r]`` is the rank's
    coordinate along the mesh dims that replicate the tensor (replicas of one piece that
    share a key with an owner send to it, keeping traffic inside one shard group).
    """

    shape: tuple[int, ...]
    runs: tuple[Optional[DimRuns], ...]
    replica_key: tuple[tuple[int, ...], ...]
    description: str

    @functools.cached_property
    def classes(self) -> tuple[tuple[DimRuns, tuple[int, ...]], ...]:
        """Distinct index sets and the (replica) ranks holding each."""
        by_runs: dict[DimRuns, list[int]] = {}
        for rank, runs in enumerate(self.runs):
            if runs is not None:
                by_runs.setdefault(runs, []).append(rank)
        return tuple((runs, tuple(holders)) for runs, holders in by_runs.items())

    @functools.cached_property
    def class_bounds(self) -> np.ndarray:
        """[class, dim, (lo, hi)]: the global index range each class spans (empty classes: lo = hi)."""
        bounds = np.zeros((len(self.classes), len(self.shape), 2), dtype=np.int64)
        for c, (runs, _) in enumerate(self.classes):
            for d, dim_runs in enumerate(runs):
                if dim_runs:
                    bounds[c, d] = (min(g for _, g, _ in dim_runs), max(g + n for _, g, n in dim_runs))
        return bounds

    def local_shape(self, rank: int) -> tuple[int, ...]:
        runs = self.runs[rank]
        if runs is None:
            return tuple(0 for _ in self.shape)
        return tuple(sum(length for _, _, length in dim) for dim in runs)


def _compress(indices: Sequence[int]) -> tuple[Run, ...]:
    runs: list[list[int]] = []
    for local, g in enumerate(indices):
        if runs and runs[-1][1] + runs[-1][2] == g:
            runs[-1][2] += 1
        else:
            runs.append([local, g, 1])
    return tuple(Run(*r) for r in runs)


def _shards_dim(placement, dim: int) -> bool:
    return isinstance(placement, (Shard, _StridedShard)) and placement.dim == dim


def _dim_indices(size: int, dim: int, ndim: int, placements, mesh_shape, coord) -> list[int]:
    """Global indices along ``dim`` held at mesh ``coord``, using torch's own split rule per mesh dim."""
    probe_shape = [1] * ndim
    probe_shape[dim] = size
    idx = torch.arange(size).view(probe_shape)
    for mesh_dim, placement in enumerate(placements):
        if _shards_dim(placement, dim):
            chunks, _ = placement._split_tensor(idx, mesh_shape[mesh_dim], with_padding=False, contiguous=False)
            idx = chunks[coord[mesh_dim]]
    return idx.reshape(-1).tolist()


def dtensor_layout(shape: Sequence[int], mesh, placements: Sequence, group_ranks: Sequence[int]) -> Layout:
    """Cached: every layer of a model shares shape, mesh and placements, so each layout is computed once."""
    return _dtensor_layout(tuple(shape), mesh, tuple(placements), tuple(group_ranks))


@functools.lru_cache(maxsize=4096)
def _dtensor_layout(shape: tuple[int, ...], mesh, placements: tuple, group_ranks: tuple[int, ...]) -> Layout:
    for p in placements:
        if not (isinstance(p, (Shard, _StridedShard, Replicate))):
            raise ValueError(f"unsupported placement {p} for a parameter (expected Shard or Replicate)")
    position = {g: i for i, g in enumerate(group_ranks)}
    mesh_ranks = mesh.mesh
    runs: list[Optional[DimRuns]] = [None] * len(group_ranks)
    replica_key: list[tuple[int, ...]] = [()] * len(group_ranks)
    cache: dict[tuple, tuple[Run, ...]] = {}
    replicate_dims = [i for i, p in enumerate(placements) if isinstance(p, Replicate)]
    for coord in itertools.product(*(range(s) for s in mesh.shape)):
        rank = int(mesh_ranks[coord])
        if rank not in position:
            raise ValueError(f"mesh rank {rank} is outside the optimizer's communication group {list(group_ranks)}")
        per_dim = []
        for d, size in enumerate(shape):
            key = (d, tuple(coord[i] for i, p in enumerate(placements) if _shards_dim(p, d)))
            if key not in cache:
                cache[key] = _compress(_dim_indices(size, d, len(shape), placements, mesh.shape, coord))
            per_dim.append(cache[key])
        runs[position[rank]] = tuple(per_dim)
        replica_key[position[rank]] = tuple(coord[i] for i in replicate_dims)
    description = f"{mesh.mesh_dim_names or tuple(mesh.shape)}:{tuple(str(p) for p in placements)}"
    return Layout(shape, tuple(runs), tuple(replica_key), description)


def replicated_layout(shape: tuple[int, ...], world: int) -> Layout:
    """A plain tensor every rank of the group holds whole (DDP style); world=1 is single process."""
    full = tuple((Run(0, 0, s),) for s in shape)
    return Layout(shape, (full,) * world, ((),) * world, f"replicated×{world}")


def layout_of(param: torch.Tensor, group_ranks: Sequence[int]) -> Layout:
    if isinstance(param, DTensor):
        return dtensor_layout(param.shape, param.device_mesh, param.placements, group_ranks)
    return replicated_layout(tuple(param.shape), len(group_ranks))


def widened(layout: Layout, width: int) -> Layout:
    """The layout of the same tensor seen with its last dim ``width`` times wider (an fp32 tensor
    viewed as 2-byte elements: each element becomes ``width`` consecutive ones)."""
    if width == 1:
        return layout

    def widen(runs: Optional[DimRuns]) -> Optional[DimRuns]:
        if runs is None:
            return None
        last = tuple(Run(r.local * width, r.start * width, r.length * width) for r in runs[-1])
        return runs[:-1] + (last,)

    shape = layout.shape[:-1] + (layout.shape[-1] * width,)
    return Layout(shape, tuple(widen(r) for r in layout.runs), layout.replica_key,
                  f"{layout.description}×{width}")
