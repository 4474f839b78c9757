"""Matrices → owners and buckets: a frozen plan, built once, identical on every rank.

Every Muon matrix is a set of row blocks (boxes) in its parameter's global index space
(``views``). Intersecting each block with the layout (``layout``) and placing the result at the
block's rows in the stacked matrix gives the *pieces* each rank holds of each matrix; ranks
holding identical index sets are replicas. The plan picks one owner per matrix among the ranks holding
its pieces (balancing Newton–Schulz FLOPs), one sender per distinct piece and every holder as a
receiver of the result, then cuts the work into buckets whose working memory (the stacked
matrices, the NS iterates and Gram matrices) fits the budget. It is a pure function of its
inputs and carries a signature that ranks compare before they communicate. What one rank does
per bucket is ``schedule``'s job.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import numpy as np

from .layout import DimRuns, Layout, Run
from .layout import dtensor_layout, layout_of, replicated_layout  # noqa: F401 - where they lived before layout.py
from .numerics import NSKey
from .views import MatrixView, RowSet, lr_scale

OWNER_POLICIES = ("balanced", "round_robin")

Slices = tuple[tuple[int, int], ...]  # a [start, stop) range per tensor dim


# --------------------------------------------------------------------------- pieces


def slices_shape(s: Slices) -> tuple[int, ...]:
    return tuple(b - a for a, b in s)


def slices_numel(s: Slices) -> int:
    return math.prod(slices_shape(s))


@dataclass(frozen=True)
class Block:
    """A rectangular piece: ``local`` indexes a holder's local tensor, ``box`` the stacked matrix's box
    (``RowSet.box_shape``)."""

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
    ns_key: NSKey  # matrices batch together only under one key
    adjust_lr: Optional[str]
    group: int  # param-group index: matrices of one group and shape share a stack (one lr)
    companion_of: Optional[int] = None  # per-row state (NorMuon) of the matrices of params[companion_of]


@dataclass(frozen=True)
class Matrix:
    param: int  # index into Plan.params
    index: int  # which matrix of the parameter's view
    shape: tuple[int, int]
    row_set: RowSet  # where its rows are in the parameter; pieces index row_set.box_shape
    scale: float
    flops: int
    nbytes: int  # the matrix in the NS dtype
    work_bytes: int  # what orthogonalizing it costs its owner's bucket budget (see working_bytes)
    pieces: tuple[PieceSet, ...]
    owner: int
    senders: tuple[int, ...]  # one per piece set: who sends it to the owner
    companion_of: Optional[int] = None  # the matrix whose per-row state this is (same owner and bucket)


@dataclass(frozen=True)
class Plan:
    world: int
    params: tuple[MatrixSpec, ...]
    matrices: tuple[Matrix, ...]
    buckets: tuple[tuple[int, ...], ...]  # matrix indices; each bucket has one ns_key
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

    def work_bytes_per_bucket(self) -> list[list[int]]:
        """[bucket][rank] -> working bytes of the matrices the rank orthogonalizes in that bucket."""
        out = []
        for bucket in self.buckets:
            per_rank = [0] * self.world
            for mi in bucket:
                per_rank[self.matrices[mi].owner] += self.matrices[mi].work_bytes
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


def working_bytes(m: int, n: int, itemsize: int) -> int:
    """Bytes an owner needs to orthogonalize an m×n matrix: the stacked matrix, the other NS
    iterate, its share of the pieces in flight (one matrix more) and the two s×s Gram matrices."""
    s = min(m, n)
    return itemsize * (3 * m * n + 2 * s * s)


class _Found(NamedTuple):
    """A matrix as found in its parameter, before it has an owner."""

    param: int
    index: int
    shape: tuple[int, int]
    row_set: RowSet
    pieces: tuple[PieceSet, ...]
    flops: int
    eligible: tuple[int, ...]  # ranks holding a piece of it
    local: dict[int, int]  # elements each holder has
    companion_of: Optional[int]


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


def _shifted(block: Block, dim: int, offset: int) -> Block:
    """``block`` with its box moved ``offset`` along ``dim`` (a row block's place in the stacked matrix)."""
    if not offset:
        return block
    box = list(block.box)
    a, b = box[dim]
    box[dim] = (a + offset, b + offset)
    return Block(block.local, tuple(box))


def _matrix_pieces(layout: Layout, row_set: RowSet) -> tuple[PieceSet, ...]:
    """Each row block intersected with the layout, its boxes placed at the block's rows in the
    stacked matrix; one piece set per set of holders (a holder sends all its blocks of a matrix at once)."""
    by_holders: dict[tuple[int, ...], list[Block]] = {}
    for region, offset in zip(row_set.blocks, row_set.row_offsets):
        for ps in _piece_sets(layout, region):
            by_holders.setdefault(ps.holders, []).extend(_shifted(b, row_set.row_dim, offset) for b in ps.blocks)
    return tuple(PieceSet(holders, tuple(blocks)) for holders, blocks in by_holders.items())


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


def _cut_buckets(matrices: Sequence[Matrix], keys: Sequence[NSKey], batches: Sequence[int], world: int,
                 budget: int) -> tuple[tuple[int, ...], ...]:
    """Each bucket takes, for every rank, its next owned matrices up to half the budget of working bytes.

    Half, because two buckets are in flight at once (one computing, the next arriving). A matrix
    larger than half the budget fills its owner's share of a bucket alone.
    """
    half = max(1, budget // 2)
    buckets: list[tuple[int, ...]] = []
    owned: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        if m.companion_of is None:
            owned.setdefault((keys[i], m.owner), []).append(i)
    for key in dict.fromkeys(keys):
        # Same-shape matrices of one group next to each other, so a bucket batches them into one NS call.
        queues = [collections.deque(sorted(owned.get((key, r), ()), key=lambda i: (matrices[i].shape, batches[i], i)))
                  for r in range(world)]
        while any(queues):
            bucket = []
            for queue in queues:
                used = 0
                while queue and (used == 0 or used + matrices[queue[0]].work_bytes <= half):
                    used += matrices[queue[0]].work_bytes
                    bucket.append(queue.popleft())
            buckets.append(bucket)
    bucket_of = {mi: b for b, bucket in enumerate(buckets) for mi in bucket}
    for i, m in enumerate(matrices):  # per-row state goes wherever its matrix goes
        if m.companion_of is not None:
            buckets[bucket_of[m.companion_of]].append(i)
    return tuple(tuple(sorted(bucket)) for bucket in buckets)


def build_plan(specs: Sequence[MatrixSpec], world: int, *, bucket_bytes: int, owner_policy: str = "balanced") -> Plan:
    if owner_policy not in OWNER_POLICIES:
        raise ValueError(f"owner_policy must be one of {OWNER_POLICIES}, got {owner_policy!r}")
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    found: list[_Found] = []
    first: list[int] = []  # index of each spec's first matrix
    for pi, spec in enumerate(specs):
        first.append(len(found))
        for mi, (row_set, shape) in enumerate(zip(spec.view.row_sets, spec.view.matrix_shapes)):
            pieces = _matrix_pieces(spec.layout, row_set)
            eligible = tuple(sorted({h for ps in pieces for h in ps.holders}))
            if not eligible:
                raise ValueError(f"{spec.name}: matrix {mi} is held by no rank; the layout {spec.layout.description} is inconsistent")
            local = {h: sum(b.numel for b in ps.blocks) for ps in pieces for h in ps.holders}
            companion_of = None if spec.companion_of is None else first[spec.companion_of] + mi
            flops = 0 if companion_of is not None else ns_flops(*shape, spec.ns_key.schedule.steps)
            found.append(_Found(pi, mi, shape, row_set, pieces, flops, eligible, local, companion_of))
    main = [i for i, f in enumerate(found) if f.companion_of is None]
    assigned = _assign_owners([(found[i].flops, found[i].eligible, found[i].local) for i in main], world, owner_policy)
    owners = {i: assigned[k] for k, i in enumerate(main)}
    matrices = []
    for i, f in enumerate(found):
        spec = specs[f.param]
        owner = owners[i if f.companion_of is None else f.companion_of]
        itemsize = spec.ns_key.itemsize
        matrices.append(
            Matrix(
                param=f.param, index=f.index, shape=f.shape, row_set=f.row_set, scale=lr_scale(*f.shape, spec.adjust_lr),
                flops=f.flops, nbytes=f.shape[0] * f.shape[1] * itemsize, work_bytes=working_bytes(*f.shape, itemsize),
                pieces=f.pieces, owner=owner, senders=tuple(_choose_sender(ps, owner, spec.layout) for ps in f.pieces),
                companion_of=f.companion_of,
            )
        )
    buckets = _cut_buckets(matrices, [specs[m.param].ns_key for m in matrices],
                           [specs[m.param].group for m in matrices], world, bucket_bytes)
    signature = plan_signature(specs, world, bucket_bytes, owner_policy)
    return Plan(world, tuple(specs), tuple(matrices), buckets, bucket_bytes, owner_policy, signature)


def plan_signature(specs: Sequence[MatrixSpec], world: int, bucket_bytes: int, owner_policy: str) -> str:
    """A digest of everything the plan depends on; ranks that disagree on it must not communicate."""
    h = hashlib.sha256(repr((world, bucket_bytes, owner_policy)).encode())
    for spec in specs:
        h.update(repr(spec_fingerprint(spec)).encode())
    return h.hexdigest()


def spec_fingerprint(spec: MatrixSpec) -> tuple:
    return (spec.name, spec.view.shape, spec.view.row_sets, spec.layout.description, spec.ns_key, spec.adjust_lr, spec.group,
            spec.companion_of)


