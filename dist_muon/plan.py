"""From parameter layouts and views to owners and buckets: a frozen plan, built once.

Every Muon matrix is a box in its parameter's global index space (``views``). A
*layout* says which global indices each rank holds along every tensor dim (for a
DTensor: derived from its mesh and placements by torch's own split rules). Intersecting
boxes with layouts gives the *pieces* each rank holds of each matrix. Ranks holding
identical index sets are replicas of one another. The plan picks one owner per matrix
among the ranks holding its pieces (balancing Newton–Schulz FLOPs), one sender per
distinct piece, and every holder as a receiver of the result; then it cuts the work into
buckets under a memory budget. It is a pure function of the inputs, identical on every
rank, and carries a signature that ranks compare before the first collective.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from .views import MatrixView, lr_scale

OWNER_POLICIES = ("balanced", "round_robin")

# (local_start, global_start, length) of a contiguous stretch along one tensor dim.
Run = tuple[int, int, int]
DimRuns = tuple[tuple[Run, ...], ...]
Slices = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------- layouts


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
    return tuple(tuple(r) for r in runs)


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
    full = tuple(((0, 0, s),) for s in shape)
    return Layout(shape, (full,) * world, ((),) * world, f"replicated×{world}")


def layout_of(param: torch.Tensor, group_ranks: Sequence[int]) -> Layout:
    if isinstance(param, DTensor):
        return dtensor_layout(param.shape, param.device_mesh, param.placements, group_ranks)
    return replicated_layout(tuple(param.shape), len(group_ranks))


# --------------------------------------------------------------------------- pieces


def slices_shape(s: Slices) -> tuple[int, ...]:
    return tuple(b - a for a, b in s)


def slices_numel(s: Slices) -> int:
    return math.prod(slices_shape(s))


@dataclass(frozen=True)
class Block:
    """A rectangular piece: ``local`` indexes a holder's local tensor, ``box`` the matrix's box."""

    local: Slices
    box: Slices

    @property
    def shape(self) -> tuple[int, ...]:
        return slices_shape(self.box)

    @property
    def numel(self) -> int:
        return slices_numel(self.box)


def _intersect(runs: tuple[Run, ...], start: int, stop: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    out = []
    for local, g, length in runs:
        a, b = max(start, g), min(stop, g + length)
        if a < b:
            out.append(((local + a - g, local + b - g), (a - start, b - start)))
    return out


def blocks_of(region, runs: DimRuns) -> tuple[Block, ...]:
    per_dim = [_intersect(dim_runs, a, b) for dim_runs, (a, b) in zip(runs, region)]
    return tuple(
        Block(tuple(p[0] for p in combo), tuple(p[1] for p in combo)) for combo in itertools.product(*per_dim)
    )


@dataclass(frozen=True)
class PieceSet:
    """The blocks of one matrix held identically by a set of replica ranks."""

    holders: tuple[int, ...]
    blocks: tuple[Block, ...]


# --------------------------------------------------------------------------- matrices and the plan


@dataclass(frozen=True)
class MatrixSpec:
    """What the plan needs to know about one parameter of a Muon-family group."""

    name: str
    view: MatrixView
    layout: Layout
    ns_key: tuple  # (ns_dtype name, schedule coefficients, norm_scale, eps): what must batch together
    adjust_lr: Optional[str]
    itemsize: int


@dataclass(frozen=True)
class Matrix:
    param: int  # index into Plan.params
    index: int  # which matrix of the parameter's view
    shape: tuple[int, int]
    region: tuple[tuple[int, int], ...]
    scale: float
    flops: int
    nbytes: int
    pieces: tuple[PieceSet, ...]
    owner: int
    senders: tuple[int, ...]  # one per piece set: who sends it to the owner


@dataclass(frozen=True)
class Plan:
    world: int
    params: tuple[MatrixSpec, ...]
    matrices: tuple[Matrix, ...]
    buckets: tuple[tuple[int, ...], ...]  # matrix indices; each bucket has one ns_key
    overlap: tuple[bool, ...]  # overlap[b]: bucket b+1 may move while bucket b computes
    bucket_bytes: int
    owner_policy: str
    signature: str = field(compare=False)

    def flops_per_rank(self) -> list[int]:
        load = [0] * self.world
        for m in self.matrices:
            load[m.owner] += m.flops
        return load

    def imbalance(self) -> float:
        load = self.flops_per_rank()
        mean = sum(load) / len(load)
        return max(load) / mean if mean else 1.0

    def assembled_bytes_per_bucket(self) -> list[list[int]]:
        """[bucket][rank] -> bytes of whole matrices the rank assembles for that bucket."""
        out = []
        for bucket in self.buckets:
            per_rank = [0] * self.world
            for mi in bucket:
                per_rank[self.matrices[mi].owner] += self.matrices[mi].nbytes
            out.append(per_rank)
        return out

    def describe(self) -> str:
        load = self.flops_per_rank()
        owned = [0] * self.world
        for m in self.matrices:
            owned[m.owner] += 1
        lines = [
            f"dist_muon plan: {len(self.params)} parameters, {len(self.matrices)} matrices, "
            f"{len(self.buckets)} buckets (budget {self.bucket_bytes / 2**20:.1f} MiB), "
            f"world {self.world}, owners {self.owner_policy}, imbalance {self.imbalance():.3f}, "
            f"signature {self.signature[:12]}",
        ]
        for r in range(self.world):
            lines.append(f"  rank {r}: owns {owned[r]} matrices, {load[r] / 1e9:.3f} GFLOP per step")
        return "\n".join(lines)


def ns_flops(m: int, n: int, steps: int) -> int:
    """FLOPs of Newton–Schulz on an m×n matrix: X·Xᵀ, A·A and B·X per step, on the wide orientation."""
    s, l = min(m, n), max(m, n)
    return steps * (4 * s * s * l + 2 * s * s * s)


def _piece_sets(layout: Layout, region) -> tuple[PieceSet, ...]:
    lo = np.array([a for a, _ in region])
    hi = np.array([b for _, b in region])
    bounds = layout.class_bounds
    touching = np.nonzero(((bounds[:, :, 0] < hi) & (bounds[:, :, 1] > lo)).all(axis=1))[0]
    sets = []
    for c in touching.tolist():
        runs, holders = layout.classes[c]
        blocks = tuple(b for b in blocks_of(region, runs) if b.numel)
        if blocks:
            sets.append(PieceSet(holders, blocks))
    return tuple(sets)


def _choose_sender(pieces: PieceSet, owner: int, layout: Layout) -> int:
    if owner in pieces.holders:
        return owner
    same_replica = [h for h in pieces.holders if layout.replica_key[h] == layout.replica_key[owner]]
    return (same_replica or list(pieces.holders))[0]


def _assign_owners(candidates: list[tuple[int, tuple[int, ...], dict[int, int]]], world: int, policy: str) -> dict[int, int]:
    """candidates: (flops, eligible ranks, local elements per rank) per matrix -> owner per matrix.

    "balanced" is longest-processing-time-first: matrices with one eligible rank are fixed,
    then the rest go, largest first, to the least-loaded eligible rank (ties: most local data).
    """
    load = [0] * world
    owners: dict[int, int] = {}
    if policy == "round_robin":
        counter = 0
        for i, (flops, eligible, _) in enumerate(candidates):
            owners[i] = eligible[counter % len(eligible)]
            counter += 1
        return owners
    for i, (flops, eligible, _) in enumerate(candidates):
        if len(eligible) == 1:
            owners[i] = eligible[0]
            load[eligible[0]] += flops
    rest = sorted((i for i in range(len(candidates)) if i not in owners), key=lambda i: (-candidates[i][0], i))
    for i in rest:
        flops, eligible, local = candidates[i]
        owner = min(eligible, key=lambda r: (load[r], -local.get(r, 0), r))
        owners[i] = owner
        load[owner] += flops
    return owners


def _cut_buckets(matrices: Sequence[Matrix], keys: Sequence[tuple], world: int, budget: int) -> tuple[tuple[int, ...], ...]:
    """Each bucket takes, for every rank, its next owned matrices up to half the budget.

    Half, because two buckets are in flight at once (one computing, the next arriving).
    A matrix larger than half the budget fills its owner's share of a bucket alone.
    """
    half = max(1, budget // 2)
    buckets: list[tuple[int, ...]] = []
    owned: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        owned.setdefault((keys[i], m.owner), []).append(i)
    for key in dict.fromkeys(keys):
        # Same-shape matrices next to each other, so a bucket batches them into one NS call.
        queues = [collections.deque(sorted(owned.get((key, r), ()), key=lambda i: (matrices[i].shape, i)))
                  for r in range(world)]
        while any(queues):
            bucket = []
            for queue in queues:
                used = 0
                while queue and (used == 0 or used + matrices[queue[0]].nbytes <= half):
                    used += matrices[queue[0]].nbytes
                    bucket.append(queue.popleft())
            buckets.append(tuple(sorted(bucket)))
    return tuple(buckets)


def _overlap_allowed(per_bucket_bytes: list[list[int]], budget: int, largest: int) -> tuple[bool, ...]:
    """Whether bucket b+1 may arrive while bucket b computes, keeping every rank within budget + largest."""
    pairs = zip(per_bucket_bytes, per_bucket_bytes[1:])
    return tuple(all(x + y <= budget + largest for x, y in zip(a, b)) for a, b in pairs) + (False,)


def build_plan(specs: Sequence[MatrixSpec], world: int, *, bucket_bytes: int, owner_policy: str = "balanced") -> Plan:
    if owner_policy not in OWNER_POLICIES:
        raise ValueError(f"owner_policy must be one of {OWNER_POLICIES}, got {owner_policy!r}")
    if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    raw = []
    for pi, spec in enumerate(specs):
        steps = len(spec.ns_key[1])
        for mi, (region, (m, n)) in enumerate(zip(spec.view.regions, spec.view.matrix_shapes)):
            pieces = _piece_sets(spec.layout, region)
            eligible = sorted({h for ps in pieces for h in ps.holders})
            if not eligible:
                raise ValueError(f"{spec.name}: matrix {mi} is held by no rank; the layout {spec.layout.description} is inconsistent")
            local = {h: sum(b.numel for b in ps.blocks) for ps in pieces for h in ps.holders}
            raw.append((pi, mi, (m, n), region, pieces, ns_flops(m, n, steps), tuple(eligible), local))
    owners = _assign_owners([(r[5], r[6], r[7]) for r in raw], world, owner_policy)
    matrices = []
    for i, (pi, mi, shape, region, pieces, flops, _, _) in enumerate(raw):
        spec = specs[pi]
        owner = owners[i]
        senders = tuple(_choose_sender(ps, owner, spec.layout) for ps in pieces)
        matrices.append(
            Matrix(
                param=pi, index=mi, shape=shape, region=region, scale=lr_scale(*shape, spec.adjust_lr),
                flops=flops, nbytes=shape[0] * shape[1] * spec.itemsize, pieces=pieces, owner=owner, senders=senders,
            )
        )
    keys = [specs[m.param].ns_key for m in matrices]
    buckets = _cut_buckets(matrices, keys, world, bucket_bytes)
    signature = plan_signature(specs, world, bucket_bytes, owner_policy)
    plan = Plan(world, tuple(specs), tuple(matrices), buckets, (), bucket_bytes, owner_policy, signature)
    largest = max((m.nbytes for m in matrices), default=0)
    overlap = _overlap_allowed(plan.assembled_bytes_per_bucket(), bucket_bytes, largest)
    return dataclasses.replace(plan, overlap=overlap)


def plan_signature(specs: Sequence[MatrixSpec], world: int, bucket_bytes: int, owner_policy: str) -> str:
    """A digest of everything the plan depends on; ranks that disagree on it must not communicate."""
    h = hashlib.sha256(repr((world, bucket_bytes, owner_policy)).encode())
    for spec in specs:
        h.update(repr(spec_fingerprint(spec)).encode())
    return h.hexdigest()


def spec_fingerprint(spec: MatrixSpec) -> tuple:
    return (spec.name, spec.view.shape, spec.view.regions, spec.layout.description, spec.ns_key, spec.adjust_lr, spec.itemsize)


# --------------------------------------------------------------------------- one rank's part of a bucket

# (param index, slices into that param's local tensor)
LocalPiece = tuple[int, Slices]
# (slot of an owned matrix in this bucket, slices into the matrix's box)
BoxPiece = tuple[int, Slices]


@dataclass(frozen=True)
class BucketSchedule:
    """What one rank does for one bucket. Per-peer lists are in the same order on both ends."""

    owned: tuple[int, ...]  # matrix indices this rank orthogonalizes, by slot
    fwd_send: tuple[tuple[LocalPiece, ...], ...]  # [peer] pieces to send to their owner
    fwd_recv: tuple[tuple[BoxPiece, ...], ...]  # [peer] pieces arriving for owned matrices
    fwd_local: tuple[tuple[LocalPiece, BoxPiece], ...]  # pieces this owner already holds
    back_send: tuple[tuple[BoxPiece, ...], ...]  # [peer] result pieces to send to holders
    back_recv: tuple[tuple[LocalPiece, ...], ...]  # [peer] result pieces arriving for local shards
    back_local: tuple[tuple[BoxPiece, LocalPiece], ...]  # results this owner applies to its own shards
    params: tuple[int, ...]  # params whose local data this rank reads in this bucket
    fwd_moves: bool  # any piece crosses ranks on the way to owners (same answer on every rank)
    back_moves: bool  # any result crosses ranks on the way back

    # Elements exchanged with each peer: fixed by the plan, so counted once here rather than every step.
    @functools.cached_property
    def fwd_send_counts(self) -> list[int]:
        return _peer_counts(self.fwd_send)

    @functools.cached_property
    def fwd_recv_counts(self) -> list[int]:
        return _peer_counts(self.fwd_recv)

    @functools.cached_property
    def back_send_counts(self) -> list[int]:
        return _peer_counts(self.back_send)

    @functools.cached_property
    def back_recv_counts(self) -> list[int]:
        return _peer_counts(self.back_recv)


def _peer_counts(per_peer) -> list[int]:
    return [sum(slices_numel(piece[1]) for piece in pieces) for pieces in per_peer]


def local_schedule(plan: Plan, rank: int) -> tuple[BucketSchedule, ...]:
    return tuple(_bucket_schedule(plan, bucket, rank) for bucket in plan.buckets)


def _bucket_schedule(plan: Plan, bucket: Sequence[int], rank: int) -> BucketSchedule:
    world = plan.world
    owned = tuple(mi for mi in bucket if plan.matrices[mi].owner == rank)
    slot = {mi: s for s, mi in enumerate(owned)}
    fwd_send = [[] for _ in range(world)]
    fwd_recv = [[] for _ in range(world)]
    back_send = [[] for _ in range(world)]
    back_recv = [[] for _ in range(world)]
    fwd_local, back_local, params = [], [], set()
    fwd_moves = back_moves = False
    for mi in bucket:
        m = plan.matrices[mi]
        for pieces, sender in zip(m.pieces, m.senders):
            fwd_moves |= sender != m.owner
            back_moves |= any(h != m.owner for h in pieces.holders)
            for block in pieces.blocks:
                local, box = (m.param, block.local), (slot.get(mi), block.box)
                if sender == rank:
                    params.add(m.param)
                    if m.owner == rank:
                        fwd_local.append((local, box))
                    else:
                        fwd_send[m.owner].append(local)
                elif m.owner == rank:
                    fwd_recv[sender].append(box)
                for holder in pieces.holders:
                    if holder == rank == m.owner:
                        back_local.append((box, local))
                    elif m.owner == rank:
                        back_send[holder].append(box)
                    elif holder == rank:
                        back_recv[m.owner].append(local)
    freeze = lambda lists: tuple(tuple(x) for x in lists)  # noqa: E731
    return BucketSchedule(
        owned, freeze(fwd_send), freeze(fwd_recv), tuple(fwd_local), freeze(back_send), freeze(back_recv),
        tuple(back_local), tuple(sorted(params)), fwd_moves, back_moves,
    )
