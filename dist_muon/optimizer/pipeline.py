"""Executing a rank's schedule: each bucket is a handful of vectorised ops over views frozen once per plan.

Per bucket, top to bottom:

1. stage: inputs needed only in parts are copied whole into the bucket's workspace slot;
2. forward: every input piece goes, in one ``_foreach_copy_``, to the send buffer or to this
   rank's own stacks; the all-to-all starts;
3. unpack: received pieces go into the stacks (one ``_foreach_copy_``);
4. Newton–Schulz on each stack, in place, with the lr scale folded into its last step (NorMuon
   stacks: then the per-row normalisation, updating the per-row state that came with them);
5. back: result pieces go to the back send buffer (one copy) and onto this rank's own outputs
   (one ``_foreach_add_``; NorMuon's per-row state is copied, not added); the all-to-all back starts;
6. apply: received results are added onto the outputs (one ``_foreach_add_``).

Bucket b+1's forward runs while bucket b computes; they live in the two slots of the workspace.
The workspace's storage exists only during ``run`` (released between steps; kept for a captured
CUDA graph), yet every view into it is made once. Inputs (gradients) are new tensors every step,
so they are passed in and read whole; outputs (parameters, Muown's update buffers) persist, and
views into them are remade only when an output's memory moved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import comm
from ..numerics import newton_schulz_, normuon_rows_, row_state_dtype
from ..schedule import INPUT, OUTPUT, BucketSchedule, Copy, Stack, Window
from .strided import StandIns


@dataclass
class StepStats:
    """What one rank did in one optimizer step; log ``as_dict()``.

    Counts come from the frozen schedule. Times are host wall-clock seconds spent waiting for
    all-to-alls and running NS calls; on CUDA they include only what the host waited for.
    ``workspace_bytes`` is the size of the two workspace slots that exist during the step.
    With QK-clip, ``qk_max_logit`` (the largest max logit of this optimizer's heads, over its ranks)
    and ``qk_heads_clipped`` are 0-dim device tensors, left on the device so the step does not sync;
    ``as_dict()`` reads them as numbers.
    """

    rank: int = 0
    matrices_owned: int = 0
    ns_flops: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    buckets: int = 0
    workspace_bytes: int = 0
    comm_seconds: float = 0.0
    ns_seconds: float = 0.0
    skipped: bool = False
    qk_max_logit: Optional[torch.Tensor] = None
    qk_heads_clipped: Optional[torch.Tensor] = None

    def as_dict(self) -> dict:
        return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}


class Workspace:
    """Two flat byte slots, each as large as its largest bucket needs; storage only during a step."""

    ALIGN = 64

    def __init__(self, schedules: Sequence[BucketSchedule], device):
        sizes = [0, 0]
        for s in schedules:
            sizes[s.slot] = max(sizes[s.slot], -(-s.size * s.key.itemsize // self.ALIGN) * self.ALIGN)
        self.nbytes = tuple(sizes)
        self.slots = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]
        self._typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def view(self, w: Window, slot: int, dtype: torch.dtype) -> torch.Tensor:
        """A view that stays valid across ``release``/``acquire`` (made while the storage exists)."""
        key = (slot, dtype)
        if key not in self._typed:
            self._typed[key] = self.slots[slot].view(dtype)
        return self._typed[key].as_strided(w.shape, w.strides, w.offset)

    def acquire(self) -> None:
        for t, n in zip(self.slots, self.nbytes):
            t.untyped_storage().resize_(n)

    def release(self) -> None:
        for t in self.slots:
            t.untyped_storage().resize_(0)


@dataclass
class _Copies:
    """A list of copies as tensors: ``dst`` and ``src`` views, with holes where a step's tensor goes."""

    dst: list[Optional[torch.Tensor]] = field(default_factory=list)
    src: list[Optional[torch.Tensor]] = field(default_factory=list)
    per_step_src: list[tuple[int, int]] = field(default_factory=list)  # (position, param): whole input
    output_dst: list[tuple[int, Window]] = field(default_factory=list)  # (position, window): an output view

    def sources(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.per_step_src:
            return self.src
        src = list(self.src)
        for pos, param in self.per_step_src:
            src[pos] = inputs[param]
        return src


@dataclass
class _StackViews:
    record: Stack
    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    result: torch.Tensor
    rows: Optional[torch.Tensor]  # NorMuon's per-row second moments, fp32 [k, m, 1]


@dataclass
class _Bucket:
    """A bucket's schedule turned into tensors."""

    schedule: BucketSchedule
    stage: _Copies
    forward: _Copies
    send: torch.Tensor
    recv: torch.Tensor
    unpack: _Copies
    stacks: list[_StackViews]
    back: _Copies
    apply_local: _Copies
    back_send: torch.Tensor
    back_recv: torch.Tensor
    apply_received: _Copies
    assign_local: _Copies
    assign_received: _Copies


class BucketRunner:
    """Runs every bucket of a plan for one rank and one step."""

    def __init__(self, schedules: Sequence[BucketSchedule], group: comm.CommGroup, device, compile_ns: bool = False,
                 keep_workspace: bool = False):
        """``keep_workspace``: keep the workspace's memory between steps (a captured graph needs fixed
        addresses); otherwise it exists only during ``run``."""
        self.schedules, self.group, self.device = tuple(schedules), group, device
        self.newton_schulz = torch.compile(newton_schulz_, dynamic=False) if compile_ns else newton_schulz_
        self.workspace = Workspace(self.schedules, device)
        self.keep_workspace = keep_workspace
        self.buckets = [self._freeze(s) for s in self.schedules]
        self._stack_params = {id(st): torch.tensor(st.record.params, dtype=torch.long, device=device)
                              for bucket in self.buckets for st in bucket.stacks} if keep_workspace else {}
        if not keep_workspace:
            self.workspace.release()
        self._outputs: tuple[int, ...] = ()
        self._standins = StandIns()
        totals = StepStats(rank=group.rank, buckets=len(schedules), workspace_bytes=sum(self.workspace.nbytes))
        for s in self.schedules:
            totals.matrices_owned += s.matrices
            totals.ns_flops += s.flops
            totals.bytes_sent += s.bytes_sent
            totals.bytes_received += s.bytes_received
        self._totals = totals

    # -- freezing a schedule into views

    def _freeze(self, s: BucketSchedule) -> _Bucket:
        view = lambda w: self.workspace.view(w, s.slot, s.key.dtype)  # noqa: E731
        stacks = [_StackViews(st, view(st.x), view(st.y), view(st.gram[0]), view(st.gram[1]), view(st.result),
                              None if st.rows is None else view(st.rows).view(row_state_dtype(s.key.dtype)))
                  for st in s.stacks]
        return _Bucket(
            s, self._copies(s.stage, view), self._copies(s.forward, view),
            view(s.forward_exchange.send), view(s.forward_exchange.recv), self._copies(s.unpack, view), stacks,
            self._copies(s.back, view), self._copies(s.apply_local, view),
            view(s.back_exchange.send), view(s.back_exchange.recv), self._copies(s.apply_received, view),
            self._copies(s.assign_local, view), self._copies(s.assign_received, view),
        )

    @staticmethod
    def _copies(copies: Sequence[Copy], view) -> _Copies:
        out = _Copies()
        for pos, c in enumerate(copies):
            if c.src.space.kind == INPUT:  # whole inputs only: parts were staged by the schedule
                out.src.append(None)
                out.per_step_src.append((pos, c.src.space.param))
            else:
                out.src.append(view(c.src))
            if c.dst.space.kind == OUTPUT:
                out.dst.append(None)
                out.output_dst.append((pos, c.dst))
            else:
                out.dst.append(view(c.dst))
        return out

    def _bind_outputs(self, outputs: Sequence[torch.Tensor]) -> None:
        """Views into the outputs, remade only when an output's memory moved (``p.data = ...``,
        FSDP2 resharding, a new tensor). Non-contiguous outputs are viewed through stand-ins."""
        addresses = tuple(t.data_ptr() for t in outputs)
        if addresses == self._outputs:
            return
        outputs = self._standins.bind(outputs)
        for bucket in self.buckets:
            for copies in (bucket.apply_local, bucket.apply_received, bucket.assign_local, bucket.assign_received):
                for pos, w in copies.output_dst:
                    copies.dst[pos] = _output_view(outputs[w.space.param], w)
        self._outputs = addresses

    # -- one step

    def run(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], factors: dict[int, float],
            muted: frozenset = frozenset(), normuon: Optional[dict[int, tuple[float, float]]] = None,
            live: Optional[Live] = None) -> StepStats:
        """Orthogonalize every matrix and add ``factor · s · O`` onto its output.

        ``inputs[p]`` / ``outputs[p]``: the local NS input and output of plan parameter p (for a
        NorMuon parameter's per-row state: that state, read and overwritten); ``factors[g]``: the
        factor of param group g (−lr for Muon); ``normuon[g]``: (beta2, eps) of NorMuon groups;
        results of parameters in ``muted`` are zeroed before they are applied (no gradient this step).
        With ``live`` (needs ``keep_workspace``), ``factors`` hold only the sign and lr and the
        gradient mask come from device memory instead (``muted`` is ignored).
        """
        stats = StepStats(**self._totals.as_dict())
        self._bind_outputs(outputs)
        self._standins.enter(outputs)
        if not self.keep_workspace:
            self.workspace.acquire()
        try:
            n = len(self.buckets)
            forward = self._start_forward(self.buckets[0], inputs) if n else None
            pending = None
            for b, bucket in enumerate(self.buckets):
                self._wait(forward, stats)
                _foreach_copy(bucket.unpack, inputs)
                if pending is not None:  # frees the slot bucket b+1 is about to use
                    self._finish_back(*pending, stats)
                    pending = None
                forward = self._start_forward(self.buckets[b + 1], inputs) if b + 1 < n else None
                self._orthogonalize(bucket, factors, muted, normuon or {}, live, stats)
                pending = (bucket, self._start_back(bucket, inputs))
            if pending is not None:
                self._finish_back(*pending, stats)
            self._standins.leave(outputs)
        finally:
            if not self.keep_workspace:
                self.workspace.release()
        return stats

    def _start_forward(self, bucket: _Bucket, inputs) -> Optional[object]:
        _foreach_copy(bucket.stage, inputs)
        _foreach_copy(bucket.forward, inputs)
        ex = bucket.schedule.forward_exchange
        return comm.all_to_all(self.group, bucket.send, bucket.recv, ex.send_counts, ex.recv_counts, ex.moves)

    def _orthogonalize(self, bucket: _Bucket, factors: dict[int, float], muted: frozenset,
                       normuon: dict[int, tuple[float, float]], live: Optional[Live], stats: StepStats) -> None:
        t0 = time.perf_counter()
        schedule = bucket.schedule.key.schedule
        for st in bucket.stacks:
            factor = factors[st.record.group] * st.record.scale
            if live is not None:
                self._orthogonalize_live(st, schedule, factor, normuon, live)
                continue
            silent = [i for i, p in enumerate(st.record.params) if p in muted] if muted else []
            if st.rows is None:
                self.newton_schulz(st.x, st.y, st.a, st.b, schedule, factor)
            else:  # NorMuon's row normalisation needs the unscaled result; muted rows keep their state
                self.newton_schulz(st.x, st.y, st.a, st.b, schedule, 1.0)
                kept = [st.rows[i].clone() for i in silent]
                beta2, eps = normuon[st.record.group]
                normuon_rows_(st.result, st.rows, 1 - beta2, eps, factor)
                for i, old in zip(silent, kept):
                    st.rows[i].copy_(old)
            if silent:
                torch._foreach_zero_([st.result[i] for i in silent])
        stats.ns_seconds += time.perf_counter() - t0

    def _orthogonalize_live(self, st: _StackViews, schedule, factor: float, normuon, live: Live) -> None:
        """The same, with lr and the gradient mask read from device memory (capturable)."""
        has_grad = live.mask.index_select(0, self._stack_params[id(st)]).view(-1, 1, 1)
        if st.rows is None:
            self.newton_schulz(st.x, st.y, st.a, st.b, schedule, factor)
        else:
            self.newton_schulz(st.x, st.y, st.a, st.b, schedule, 1.0)
            beta2, eps = normuon[st.record.group]
            normuon_rows_(st.result, st.rows, has_grad * (1 - beta2), eps, factor)
        st.result.mul_(has_grad * live.lr[st.record.group])

    def _start_back(self, bucket: _Bucket, inputs) -> Optional[object]:
        _foreach_copy(bucket.back, inputs)
        _foreach_add(bucket.apply_local, inputs)
        _foreach_copy(bucket.assign_local, inputs)
        ex = bucket.schedule.back_exchange
        return comm.all_to_all(self.group, bucket.back_send, bucket.back_recv, ex.send_counts, ex.recv_counts, ex.moves)

    def _finish_back(self, bucket: _Bucket, work, stats: StepStats) -> None:
        self._wait(work, stats)
        _foreach_add(bucket.apply_received, ())
        _foreach_copy(bucket.assign_received, ())

    @staticmethod
    def _wait(work, stats: StepStats) -> None:
        if work is not None:
            t0 = time.perf_counter()
            work.wait()
            stats.comm_seconds += time.perf_counter() - t0


@dataclass
class Live:
    """Per-step values read from device memory, so a captured CUDA graph replays with current ones:
    ``lr[g]`` (0-dim) per param group and ``mask`` (one 0/1 per plan parameter: has a gradient)."""

    lr: dict[int, torch.Tensor]
    mask: torch.Tensor


def _foreach_copy(copies: _Copies, inputs) -> None:
    if copies.dst:
        torch._foreach_copy_(copies.dst, copies.sources(inputs))


def _foreach_add(copies: _Copies, inputs) -> None:
    if copies.dst:
        torch._foreach_add_(copies.dst, copies.sources(inputs))


def _output_view(tensor: torch.Tensor, w: Window) -> torch.Tensor:
    if tuple(tensor.shape) == w.shape and w.offset == 0 and tensor.is_contiguous():
        return tensor
    return tensor.as_strided(w.shape, w.strides, tensor.storage_offset() + w.offset)
