"""Executing a plan: per bucket, pieces travel to owners, owners orthogonalize whole matrices
batched by shape, and results travel back to every holder. Bucket b+1 is in flight while
bucket b computes (when the plan's memory bound allows it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .. import comm
from ..numerics import newton_schulz, resolve_ns_dtype, resolve_schedule
from ..plan import BucketSchedule, Plan


@dataclass
class MatrixJob:
    """One parameter's part of a step: what to orthogonalize, and where ``alpha · s · O`` goes."""

    make_input: Callable[[], torch.Tensor]  # local tensor (shard) of the momentum-like input
    output: torch.Tensor  # local tensor that receives alpha * update, piece by piece
    alpha: float


@dataclass
class StepStats:
    """What one rank did in one optimizer step; log ``as_dict()``.

    Times are host wall-clock seconds; on CUDA they include only what the host waited for.
    """

    rank: int = 0
    matrices_owned: int = 0
    ns_flops: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    comm_seconds: float = 0.0
    ns_seconds: float = 0.0
    peak_assembled_bytes: int = 0
    buckets: int = 0
    skipped: bool = False
    _live: int = field(default=0, repr=False)

    def hold(self, nbytes: int) -> None:
        self._live += nbytes
        self.peak_assembled_bytes = max(self.peak_assembled_bytes, self._live)

    def release(self, nbytes: int) -> None:
        self._live -= nbytes

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class _Inputs:
    """Inputs made on first use and dropped after the last bucket that reads them."""

    def __init__(self, jobs: Sequence[Optional[MatrixJob]], schedules: Sequence[BucketSchedule]):
        self.jobs = jobs
        self.cache: dict[int, torch.Tensor] = {}
        self.last_use: dict[int, int] = {}
        for b, sched in enumerate(schedules):
            for p in sched.params:
                self.last_use[p] = b

    def __getitem__(self, param: int) -> torch.Tensor:
        if param not in self.cache:
            self.cache[param] = self.jobs[param].make_input()
        return self.cache[param]

    def release(self, bucket: int) -> None:
        for p in [p for p, last in self.last_use.items() if last == bucket and p in self.cache]:
            del self.cache[p]


@dataclass
class _Owned:
    """The whole matrices a rank owns in one bucket, stacked by shape for batched Newton–Schulz."""

    stacks: dict[tuple[int, int], torch.Tensor]
    boxes: list[torch.Tensor]  # by slot: a view of the stack shaped like the matrix's region
    scales: dict[tuple[int, int], torch.Tensor]
    nbytes: int


def _allocate_owned(plan: Plan, sched: BucketSchedule, dtype: torch.dtype, device) -> _Owned:
    shapes: dict[tuple[int, int], list[int]] = {}
    for slot, mi in enumerate(sched.owned):
        shapes.setdefault(plan.matrices[mi].shape, []).append(slot)
    stacks, scales, boxes = {}, {}, [None] * len(sched.owned)
    for shape, slots in shapes.items():
        stacks[shape] = torch.empty(len(slots), *shape, dtype=dtype, device=device)
        scales[shape] = torch.tensor([plan.matrices[sched.owned[s]].scale for s in slots], dtype=dtype, device=device)
        for pos, s in enumerate(slots):
            region = plan.matrices[sched.owned[s]].region
            boxes[s] = stacks[shape][pos].view(tuple(b - a for a, b in region))
    nbytes = sum(t.numel() * t.element_size() for t in stacks.values())
    return _Owned(stacks, boxes, scales, nbytes)


class BucketRunner:
    """Runs every bucket of a plan for one rank and one step."""

    def __init__(self, plan: Plan, schedules: Sequence[BucketSchedule], group: comm.CommGroup, device,
                 compile_ns: bool = False):
        self.plan, self.schedules, self.group, self.device = plan, schedules, group, device
        self.compile_ns = compile_ns
        self.dtypes = [self._bucket_dtype(b) for b in range(len(schedules))]
        self.schedule_of = [self._bucket_schedule(b) for b in range(len(schedules))]

    def _bucket_key(self, b: int) -> tuple:
        return self.plan.params[self.plan.matrices[self.plan.buckets[b][0]].param].ns_key

    def _bucket_dtype(self, b: int) -> torch.dtype:
        return getattr(torch, self._bucket_key(b)[0])

    def _bucket_schedule(self, b: int):
        _, coefficients, norm_scale, eps = self._bucket_key(b)
        return newton_schulz.Schedule(coefficients, norm_scale, eps)

    def run(self, jobs: Sequence[Optional[MatrixJob]], stats: StepStats) -> None:
        inputs = _Inputs(jobs, self.schedules)
        n = len(self.schedules)
        forward = self._start_forward(0, inputs, stats) if n else None
        pending_back = None
        for b in range(n):
            owned = self._assemble(b, forward, inputs, stats)
            inputs.release(b)
            forward = self._start_forward(b + 1, inputs, stats) if b + 1 < n and self.plan.overlap[b] else None
            self._orthogonalize(b, owned, stats)
            back = self._start_back(b, owned, jobs, stats)
            stats.release(owned.nbytes)
            del owned
            if pending_back is not None:
                self._finish_back(*pending_back, jobs, stats)
            pending_back = (b, back)
            if forward is None and b + 1 < n:
                forward = self._start_forward(b + 1, inputs, stats)
        if pending_back is not None:
            self._finish_back(*pending_back, jobs, stats)
        stats.buckets = n

    # -- forward: pieces to owners

    def _start_forward(self, b: int, inputs: _Inputs, stats: StepStats) -> comm.Exchange:
        sched = self.schedules[b]
        source = lambda piece: inputs[piece[0]][comm.as_slices(piece[1])]  # noqa: E731
        send_counts, recv_counts = sched.fwd_send_counts, sched.fwd_recv_counts
        send = comm.pack(sched.fwd_send, send_counts, source, self.dtypes[b], self.device)
        itemsize = send.element_size()
        stats.bytes_sent += sum(send_counts) * itemsize
        stats.bytes_received += sum(recv_counts) * itemsize
        stats.hold(sum(recv_counts) * itemsize)
        return comm.all_to_all(self.group, send, send_counts, recv_counts, sched.fwd_moves)

    def _assemble(self, b: int, forward: comm.Exchange, inputs: _Inputs, stats: StepStats) -> _Owned:
        sched = self.schedules[b]
        owned = _allocate_owned(self.plan, sched, self.dtypes[b], self.device)
        stats.hold(owned.nbytes)
        for (param, local), (slot, box) in sched.fwd_local:
            owned.boxes[slot][comm.as_slices(box)].copy_(inputs[param][comm.as_slices(local)])
        t0 = time.perf_counter()
        recv = forward.wait()
        stats.comm_seconds += time.perf_counter() - t0
        comm.unpack(recv, sched.fwd_recv, lambda piece, values: owned.boxes[piece[0]][comm.as_slices(piece[1])].copy_(values))
        stats.release(recv.numel() * recv.element_size())
        return owned

    # -- compute

    def _orthogonalize(self, b: int, owned: _Owned, stats: StepStats) -> None:
        t0 = time.perf_counter()
        schedule, dtype = self.schedule_of[b], self.dtypes[b]
        for shape, stack in owned.stacks.items():
            result = newton_schulz.orthogonalize_with(stack, schedule, dtype, compiled=self.compile_ns)
            stack.copy_(result.mul_(owned.scales[shape].view(-1, 1, 1)))
        stats.ns_seconds += time.perf_counter() - t0
        stats.matrices_owned += len(self.schedules[b].owned)
        stats.ns_flops += sum(self.plan.matrices[mi].flops for mi in self.schedules[b].owned)

    # -- back: results to every holder

    def _start_back(self, b: int, owned: _Owned, jobs, stats: StepStats) -> comm.Exchange:
        sched = self.schedules[b]
        source = lambda piece: owned.boxes[piece[0]][comm.as_slices(piece[1])]  # noqa: E731
        send_counts, recv_counts = sched.back_send_counts, sched.back_recv_counts
        send = comm.pack(sched.back_send, send_counts, source, self.dtypes[b], self.device)
        for (slot, box), (param, local) in sched.back_local:
            job = jobs[param]
            job.output[comm.as_slices(local)].add_(owned.boxes[slot][comm.as_slices(box)], alpha=job.alpha)
        itemsize = send.element_size()
        stats.bytes_sent += sum(send_counts) * itemsize
        stats.bytes_received += sum(recv_counts) * itemsize
        return comm.all_to_all(self.group, send, send_counts, recv_counts, sched.back_moves)

    def _finish_back(self, b: int, back: comm.Exchange, jobs, stats: StepStats) -> None:
        t0 = time.perf_counter()
        recv = back.wait()
        stats.comm_seconds += time.perf_counter() - t0

        def apply(piece, values):
            job = jobs[piece[0]]
            job.output[comm.as_slices(piece[1])].add_(values, alpha=job.alpha)

        comm.unpack(recv, self.schedules[b].back_recv, apply)


def schedule_key(group: dict, device) -> tuple:
    """What batches together in Newton–Schulz: compute dtype and the exact coefficient schedule."""
    schedule = resolve_schedule(group["ns_method"], group["ns_steps"])
    dtype = resolve_ns_dtype(group["ns_dtype"], device)
    return (str(dtype).removeprefix("torch."), schedule.coefficients, schedule.norm_scale, schedule.eps)
