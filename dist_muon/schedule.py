"""One rank's part of each bucket, as typed transfer records over buffer windows, computed once per plan.

A bucket runs in one *slot* of a flat workspace (buckets alternate between two slots, so
bucket b+1 can arrive while bucket b computes). Inside the slot, the rank's owned matrices are
stacked by (shape, group); the same bytes are reused phase by phase::

    [0, S)        P: the stacks' results (and their input when NS takes an even number of steps)
    [S, 2S)       Q: the other Newton–Schulz iterate (the stacks' input when the count is odd)
    [2S, 2S + G)  the Gram matrices of the largest stack
    forward buffers (send, receive, staged inputs): over whichever of P, Q, G is free before NS
    back buffers (results to send, results received): from S on, never over the results in P

Every transfer is a ``Copy`` between two ``Window``s (offset, shape, strides of a flat buffer).
Copies that are contiguous on both sides and adjacent are merged, so consecutive matrices of one
parameter (the experts of a 3D weight) move as one copy, and a piece that is a rank's whole
local tensor is copied straight from it. Inputs of which a bucket needs only parts are first
copied whole into the slot ("staged"), so every piece of every bucket is a view frozen once per
plan: the executor (``optimizer/pipeline.py``) runs a bucket as a few vectorised ops, whatever
the number of matrices and pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence

from .numerics import NSKey
from .plan import Block, Plan, slices_shape


class Space(NamedTuple):
    """Which flat buffer a window reads or writes."""

    kind: str  # WORKSPACE, INPUT (a parameter's NS input this step) or OUTPUT (where its update is added)
    param: int = -1


WORKSPACE, INPUT, OUTPUT = "workspace", "input", "output"
SLOT = Space(WORKSPACE)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Window:
    """Elements of a flat buffer seen as a tensor: ``buffer.as_strided(shape, strides, offset)``."""

    space: Space
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def reshaped(self, shape: tuple[int, ...]) -> "Window":
        """The same contiguous elements under another shape."""
        return Window(self.space, self.offset, shape, contiguous_strides(shape))


def window(space: Space, base: int, buffer_shape: Sequence[int], block: Sequence[tuple[int, int]]) -> Window:
    """The block ``[a, b)`` per dim of a contiguous tensor of ``buffer_shape`` stored at ``base``."""
    strides = contiguous_strides(buffer_shape)
    offset = base + sum(a * s for (a, _), s in zip(block, strides))
    return Window(space, offset, tuple(b - a for a, b in block), strides)


@dataclass(frozen=True)
class Copy:
    src: Window
    dst: Window


@dataclass(frozen=True)
class Stack:
    """Owned matrices of one shape and one param group, orthogonalized in one batched call."""

    shape: tuple[int, int]
    group: int
    scale: float  # s(m, n), the same for every matrix of the stack
    matrices: tuple[int, ...]  # plan matrix indices, by position in the stack
    params: tuple[int, ...]  # each matrix's parameter
    x: Window  # [k, m, n]: where the matrices are assembled
    y: Window  # the other iterate
    gram: tuple[Window, Window]  # A and B, [k, s, s]
    result: Window  # x or y, by the parity of the number of NS steps
    rows: Optional[Window] = None  # NorMuon: [k, m, width], each matrix's per-row second moment


@dataclass(frozen=True)
class Exchange:
    """One uneven all-to-all: flat send and receive windows, elements per peer."""

    send: Window
    recv: Window
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    moves: bool  # some piece crosses ranks (the same answer on every rank: all call, or none)


@dataclass(frozen=True)
class BucketSchedule:
    """What one rank does for one bucket, in execution order."""

    key: NSKey
    slot: int
    size: int  # elements of the slot this bucket uses
    stage: tuple[Copy, ...]  # whole inputs of which only parts are needed → the slot
    forward: tuple[Copy, ...]  # input pieces → the send buffer and this rank's own stacks
    forward_exchange: Exchange
    unpack: tuple[Copy, ...]  # received pieces → stacks
    stacks: tuple[Stack, ...]
    back: tuple[Copy, ...]  # result pieces → the back send buffer
    apply_local: tuple[Copy, ...]  # result pieces this rank holds → outputs (added)
    back_exchange: Exchange
    apply_received: tuple[Copy, ...]  # received result pieces → outputs (added)
    flops: int  # NS FLOPs of the owned matrices
    assign_local: tuple[Copy, ...] = ()  # updated per-row state this rank holds → its state (copied)
    assign_received: tuple[Copy, ...] = ()  # received per-row state → state (copied)

    @property
    def matrices(self) -> int:
        return sum(len(s.matrices) for s in self.stacks)

    @property
    def bytes_sent(self) -> int:
        return (sum(self.forward_exchange.send_counts) + sum(self.back_exchange.send_counts)) * self.key.itemsize

    @property
    def bytes_received(self) -> int:
        return (sum(self.forward_exchange.recv_counts) + sum(self.back_exchange.recv_counts)) * self.key.itemsize


def local_schedule(plan: Plan, rank: int) -> tuple[BucketSchedule, ...]:
    rows_of = companions(plan)
    return tuple(bucket_schedule(plan, b, rank, rows_of) for b in range(len(plan.buckets)))


# --------------------------------------------------------------------------- which pieces move where


class _Piece(NamedTuple):
    matrix: int
    param: int
    block: Block


@dataclass
class _Traffic:
    """The bucket's pieces as they concern one rank, per peer, in the order both ends agree on."""

    fwd_send: list[list[_Piece]]
    fwd_recv: list[list[_Piece]]
    fwd_local: list[_Piece]
    back_send: list[list[_Piece]]
    back_recv: list[list[_Piece]]
    back_local: list[_Piece]
    fwd_moves: bool = False
    back_moves: bool = False


def _traffic(plan: Plan, bucket: Sequence[int], rank: int) -> _Traffic:
    world = plan.world
    t = _Traffic([[] for _ in range(world)], [[] for _ in range(world)], [],
                 [[] for _ in range(world)], [[] for _ in range(world)], [])
    for mi in bucket:
        m = plan.matrices[mi]
        for pieces, sender in zip(m.pieces, m.senders):
            t.fwd_moves |= sender != m.owner
            t.back_moves |= any(h != m.owner for h in pieces.holders)
            for block in pieces.blocks:
                piece = _Piece(mi, m.param, block)
                if sender == rank:
                    (t.fwd_local if m.owner == rank else t.fwd_send[m.owner]).append(piece)
                elif m.owner == rank:
                    t.fwd_recv[sender].append(piece)
                for holder in pieces.holders:
                    if holder == rank == m.owner:
                        t.back_local.append(piece)
                    elif m.owner == rank:
                        t.back_send[holder].append(piece)
                    elif holder == rank:
                        t.back_recv[m.owner].append(piece)
    return t


# --------------------------------------------------------------------------- laying out the slot


def _stacks(plan: Plan, owned: Sequence[int], steps: int, rows_of: dict[int, int]):
    """Stacks by (shape, group), laid out in the slot. Returns the stacks, each owned matrix's
    offset (per-row state: absolute; matrices: within the iterate), R, S and G (elements)."""
    by_key: dict[tuple, list[int]] = {}
    for mi in owned:
        m = plan.matrices[mi]
        by_key.setdefault((m.shape, plan.params[m.param].group), []).append(mi)
    rows_total = sum(math.prod(plan.matrices[rows_of[mi]].shape) for mi in owned if mi in rows_of)
    total = sum(math.prod(plan.matrices[mi].shape) for mi in owned)
    P, Q = rows_total, rows_total + total  # results always end in P
    fill_at, other_at = (P, Q) if steps % 2 == 0 else (Q, P)
    gram_at = Q + total
    gram_elems = max((2 * len(mis) * min(shape) ** 2 for (shape, _), mis in by_key.items()), default=0)
    stacks, where, cursor, rows_cursor = [], {}, 0, 0
    for (shape, group), mis in by_key.items():
        m, n = shape
        k, s = len(mis), min(shape)
        x = _dense(fill_at + cursor, (k, m, n))
        y = _dense(other_at + cursor, (k, m, n))
        rows = None
        if mis[0] in rows_of:  # NorMuon: each matrix's per-row state travels beside it
            width = plan.matrices[rows_of[mis[0]]].shape[1]
            rows = _dense(rows_cursor, (k, m, width))
            for pos, mi in enumerate(mis):
                where[rows_of[mi]] = rows_cursor + pos * m * width
            rows_cursor += k * m * width
        for pos, mi in enumerate(mis):
            where[mi] = cursor + pos * m * n
        stacks.append(Stack(shape, group, plan.matrices[mis[0]].scale, tuple(mis),
                            tuple(plan.matrices[mi].param for mi in mis), x, y,
                            (_dense(gram_at, (k, s, s)), _dense(gram_at + k * s * s, (k, s, s))),
                            x if steps % 2 == 0 else y, rows))
        cursor += k * m * n
    return tuple(stacks), where, rows_total, total, gram_elems


def _dense(offset: int, shape: tuple[int, ...]) -> Window:
    return Window(SLOT, offset, shape, contiguous_strides(shape))


def bucket_schedule(plan: Plan, b: int, rank: int, rows_of: Optional[dict[int, int]] = None) -> BucketSchedule:
    """``rows_of``: matrix → the matrix of its per-row state (``companions(plan)``)."""
    rows_of = companions(plan) if rows_of is None else rows_of
    bucket = plan.buckets[b]
    key = plan.params[plan.matrices[bucket[0]].param].ns_key
    steps = key.schedule.steps
    owned = [mi for mi in bucket if plan.matrices[mi].owner == rank and plan.matrices[mi].companion_of is None]
    stacks, where, R, S, G = _stacks(plan, owned, steps, rows_of)
    # Slot: [R rows | P | Q | G]; P holds the results, the stacks fill P (even steps) or Q (odd).
    P = R
    fill_at = P if steps % 2 == 0 else P + S
    traffic = _traffic(plan, bucket, rank)

    def box(piece: _Piece, base: int) -> Window:
        m = plan.matrices[piece.matrix]
        at = where[piece.matrix] if m.companion_of is not None else base + where[piece.matrix]
        return window(SLOT, at, m.row_set.box_shape, piece.block.box)

    def local(kind: str, piece: _Piece) -> Window:
        shape = plan.params[piece.param].layout.local_shape(rank)
        return window(Space(kind, piece.param), 0, shape, piece.block.local)

    def flat(base: int, piece: _Piece) -> Window:
        shape = slices_shape(piece.block.box)
        return Window(SLOT, base, shape, contiguous_strides(shape))

    def through(per_peer: list[list[_Piece]], base: int) -> tuple[list[tuple[_Piece, Window]], tuple[int, ...]]:
        """Each piece's window in a flat buffer at ``base``, peer after peer, and the count per peer."""
        out, counts, cursor = [], [], base
        for pieces in per_peer:
            start = cursor
            for piece in pieces:
                out.append((piece, flat(cursor, piece)))
                cursor += piece.block.numel
            counts.append(cursor - start)
        return out, tuple(counts)

    def forward_phase(base: int):
        sent, send_counts = through(traffic.fwd_send, base)
        send_total = sum(send_counts)
        received, recv_counts = through(traffic.fwd_recv, base + send_total)
        recv_total = sum(recv_counts)
        forward = _merge([Copy(local(INPUT, p), w) for p, w in sent]
                         + [Copy(local(INPUT, p), box(p, fill_at)) for p in traffic.fwd_local])
        unpack = _merge([Copy(w, box(p, fill_at)) for p, w in received])
        forward, stage, stage_total = _stage(plan, rank, forward, base + send_total + recv_total)
        exchange = Exchange(_flat(base, send_total), _flat(base + send_total, recv_total),
                            send_counts, recv_counts, traffic.fwd_moves)
        return stage, forward, exchange, unpack, send_total + recv_total + stage_total

    # Forward buffers live while the stacks fill: after P when P is the input, else over P when they fit.
    stage, forward, fwd_exchange, unpack, fwd_total = forward_phase(P + S if fill_at == P else P)
    if fill_at != P and fwd_total > S:
        stage, forward, fwd_exchange, unpack, fwd_total = forward_phase(P + 2 * S)
    fwd_end = fwd_exchange.send.offset + fwd_total

    # Back buffers live while results (in P) and rows (in R) are still read: after P.
    back_at = P + S
    to_send, back_counts = through(traffic.back_send, back_at)
    back_total = sum(back_counts)
    received, recv_counts = through(traffic.back_recv, back_at + back_total)
    back = _merge([Copy(box(p, P), w) for p, w in to_send])
    applied_local = [Copy(box(p, P), local(OUTPUT, p)) for p in traffic.back_local]
    applied_received = [Copy(w, local(OUTPUT, p)) for p, w in received]
    is_rows = lambda c: plan.params[c.dst.space.param].companion_of is not None  # noqa: E731
    back_exchange = Exchange(_flat(back_at, back_total), _flat(back_at + back_total, sum(recv_counts)),
                             back_counts, recv_counts, traffic.back_moves)
    size = max(P + 2 * S + G, fwd_end, back_at + back_total + sum(recv_counts))
    flops = sum(plan.matrices[mi].flops for mi in owned)
    return BucketSchedule(
        key, b % 2, size, stage, forward, fwd_exchange, unpack, stacks, back,
        _outputs([c for c in applied_local if not is_rows(c)], plan, rank), back_exchange,
        _outputs([c for c in applied_received if not is_rows(c)], plan, rank), flops,
        _outputs([c for c in applied_local if is_rows(c)], plan, rank),
        _outputs([c for c in applied_received if is_rows(c)], plan, rank),
    )


def companions(plan: Plan) -> dict[int, int]:
    """Matrix index → the index of the matrix holding its per-row state (NorMuon)."""
    return {m.companion_of: i for i, m in enumerate(plan.matrices) if m.companion_of is not None}


def _flat(offset: int, numel: int) -> Window:
    return Window(SLOT, offset, (numel,), (1,))


def _merge(copies: list[Copy]) -> tuple[Copy, ...]:
    """Adjacent copies that are contiguous on both sides become one flat copy."""
    out: list[Copy] = []
    for c in copies:
        if out and _adjacent(out[-1], c):
            last = out[-1]
            n = last.src.numel + c.src.numel
            out[-1] = Copy(last.src.reshaped((n,)), last.dst.reshaped((n,)))
        else:
            out.append(c)
    return tuple(out)


def _adjacent(a: Copy, b: Copy) -> bool:
    return (a.src.space == b.src.space and a.dst.space == b.dst.space
            and a.src.contiguous and a.dst.contiguous and b.src.contiguous and b.dst.contiguous
            and a.src.offset + a.src.numel == b.src.offset and a.dst.offset + a.dst.numel == b.dst.offset)


def _whole(w: Window, plan: Plan, rank: int) -> Optional[tuple[int, ...]]:
    """The local shape when ``w`` is a parameter's entire local tensor, else None."""
    if w.space.kind == WORKSPACE or w.offset != 0 or not w.contiguous:
        return None
    shape = plan.params[w.space.param].layout.local_shape(rank)
    return shape if w.numel == math.prod(shape) else None


def _outputs(copies: list[Copy], plan: Plan, rank: int) -> tuple[Copy, ...]:
    """Merged; copies onto a whole output tensor take its shape, so the executor can pass the tensor itself."""
    return tuple(_as_whole(c, c.dst, c.src, plan, rank) or c for c in _merge(copies))


def _as_whole(c: Copy, tensor_side: Window, other: Window, plan: Plan, rank: int) -> Optional[Copy]:
    """``c`` with both windows in the local tensor's shape when one side is a whole local tensor.

    A non-contiguous other side (a column block of a matrix) already has that shape.
    """
    shape = _whole(tensor_side, plan, rank)
    if shape is None:
        return None
    return Copy(c.src.reshaped(shape), c.dst.reshaped(shape)) if other.contiguous else c


def _stage(plan: Plan, rank: int, forward: tuple[Copy, ...], base: int) -> tuple[tuple[Copy, ...], tuple[Copy, ...], int]:
    """Whole inputs are read in place; inputs needed only in parts are staged whole at ``base``.

    Returns the forward copies rewritten to read staged inputs, the staging copies, and their size.
    Inputs change every step (gradients are new tensors), so a part of one cannot be a view frozen
    once; a staged copy in the slot can.
    """
    staged: dict[int, int] = {}
    stage: list[Copy] = []
    rewritten: list[Copy] = []
    cursor = base
    for c in forward:
        whole = _as_whole(c, c.src, c.dst, plan, rank)
        if whole is not None:
            rewritten.append(whole)
            continue
        p = c.src.space.param
        if p not in staged:
            local_shape = plan.params[p].layout.local_shape(rank)
            staged[p] = cursor
            stage.append(Copy(Window(c.src.space, 0, local_shape, contiguous_strides(local_shape)),
                              Window(SLOT, cursor, local_shape, contiguous_strides(local_shape))))
            cursor += math.prod(local_shape)
        rewritten.append(Copy(replace(c.src, space=SLOT, offset=staged[p] + c.src.offset), c.dst))
    return tuple(rewritten), tuple(stage), cursor - base
