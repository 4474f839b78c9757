"""Optimizer state stored in its own dtype (``state_dtype``): e.g. bf16 momentum and bf16 AdamW
moments for fp32 parameters, half the state memory.

The math stays in fp32. State narrower than fp32 that differs from its parameter's dtype is read
into fp32 working copies, updated there exactly as fp32 state would be, and rounded back once per
step (round to nearest even). The working copies live in a ``Scratch``: one flat buffer, a bucket
budget's worth at a time, whose storage exists only while it is used (kept for a captured CUDA
graph), with every view into it made once. Per step this costs a few foreach ops per group and
budget's worth of state, never per tensor.

State the parameter's own dtype (the default) or wider than it takes the plain paths, as before.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.optim.adamw import adamw as adamw_functional

from .momentum import in_dtypes_of, momentum_

STATE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float": torch.float32, "fp64": torch.float64, "double": torch.float64}
WORK_DTYPE = torch.float32

Decay = Union[float, Sequence[torch.Tensor]]
Shape = tuple[int, ...]


def check_state_dtype(value, label: str) -> Optional[torch.dtype]:
    """None (the parameter's dtype) or one of STATE_DTYPES; names ("bfloat16", "bf16") accepted."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        name = str(value).removeprefix("torch.")
        dtype = _NAMES.get(name, getattr(torch, name, None))
    if dtype not in STATE_DTYPES:
        names = ", ".join(repr(str(d).removeprefix("torch.")) for d in STATE_DTYPES)
        raise ValueError(f"{label}: unknown state_dtype {value!r}; use one of {names}, or leave it unset "
                         "(None) to keep each parameter's own dtype")
    return dtype


def state_dtype_of(group, param: torch.Tensor) -> torch.dtype:
    """The dtype a parameter's momentum / moments are stored in."""
    return group.get("state_dtype") or param.dtype


def rounds(state: torch.Tensor, param: torch.Tensor) -> bool:
    """State updated in fp32 and stored rounded: narrower than fp32 and not the parameter's dtype
    (bf16 parameters with bf16 state keep today's arithmetic)."""
    return state.dtype != param.dtype and state.dtype.itemsize < WORK_DTYPE.itemsize


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = WORK_DTYPE
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


# ----------------------------------------------------------------------------- scratch


@dataclass(frozen=True)
class Chunk:
    """Units ``start:stop`` of a list, and each unit's working views (one per shape of the unit)."""

    start: int
    stop: int
    views: tuple[tuple[torch.Tensor, ...], ...]


class Scratch:
    """Working copies of low-precision state, at most ``budget`` bytes at a time (a unit larger
    than the budget alone). One flat byte buffer; its storage exists only inside ``active()``
    unless ``keep`` (a captured CUDA graph needs fixed addresses)."""

    ALIGN = 64

    def __init__(self, budget: int, device, keep: bool = False):
        self.budget, self.device, self.keep = budget, device, keep
        self.base = torch.empty(0, dtype=torch.uint8, device=device)
        self.capacity = 0
        self._typed: dict[torch.dtype, torch.Tensor] = {}
        self._chunks: dict[tuple, tuple[Chunk, ...]] = {}
        self._depth = 0

    def _aligned(self, numel: int, dtype: torch.dtype) -> int:
        return -(-numel * dtype.itemsize // self.ALIGN) * self.ALIGN

    def chunks(self, units: Sequence[Sequence[Shape]], dtype: torch.dtype) -> tuple[Chunk, ...]:
        """Consecutive units cut into chunks that fit the budget; views made once per layout."""
        key = (tuple(tuple(tuple(s) for s in u) for u in units), dtype, self.budget)
        found = self._chunks.get(key)
        if found is None:
            found = self._cut(key[0], dtype)
            self._chunks[key] = found
        return found

    def _cut(self, units: tuple[tuple[Shape, ...], ...], dtype: torch.dtype) -> tuple[Chunk, ...]:
        sizes = [sum(self._aligned(_numel(s), dtype) for s in unit) for unit in units]
        bounds, start, used = [], 0, 0
        for i, size in enumerate(sizes):
            if i > start and used + size > self.budget:
                bounds.append((start, i))
                start, used = i, 0
            used += size
        if start < len(units):
            bounds.append((start, len(units)))
        self.capacity = max(self.capacity, max((sum(sizes[a:b]) for a, b in bounds), default=0))
        typed = self._typed.setdefault(dtype, self.base.view(dtype))
        out = []
        with self.active():  # views are made while the storage exists (they stay valid across resizes)
            for a, b in bounds:
                offset, views = 0, []
                for unit in units[a:b]:
                    unit_views = []
                    for shape in unit:
                        unit_views.append(typed.as_strided(shape, _contiguous_strides(shape), offset // dtype.itemsize))
                        offset += self._aligned(_numel(shape), dtype)
                    views.append(tuple(unit_views))
                out.append(Chunk(a, b, tuple(views)))
        return tuple(out)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The storage exists (at full capacity) inside; released at the outermost exit unless ``keep``."""
        storage = self.base.untyped_storage()
        if storage.nbytes() < self.capacity:
            storage.resize_(self.capacity)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and not self.keep and storage.nbytes():
                storage.resize_(0)


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _contiguous_strides(shape: Shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


# ----------------------------------------------------------------------------- Muon momentum


def group_momentum_(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                    momentum: float, nesterov: bool, decay: Decay, scratch: Scratch) -> list[torch.Tensor]:
    """``momentum_`` for one group's local tensors, rounded state included; returns each member's
    NS input in member order. Gradients are cast to the dtype the math runs in when they differ."""
    rounded = [i for i, (b, p) in enumerate(zip(bufs, params)) if rounds(b, p)]
    if not rounded:
        return momentum_(params, in_dtypes_of(grads, bufs), bufs, momentum, nesterov, decay)
    direct = [i for i in range(len(bufs)) if i not in set(rounded)]
    out: list[Optional[torch.Tensor]] = [None] * len(bufs)
    pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
    pick_decay = lambda idx: decay if isinstance(decay, float) else pick(decay, idx)  # noqa: E731
    if direct:
        d_bufs = pick(bufs, direct)
        for i, t in zip(direct, momentum_(pick(params, direct), in_dtypes_of(pick(grads, direct), d_bufs), d_bufs,
                                          momentum, nesterov, pick_decay(direct))):
            out[i] = t
    for i, t in zip(rounded, rounded_momentum_(pick(params, rounded), pick(grads, rounded), pick(bufs, rounded),
                                               momentum, nesterov, pick_decay(rounded), scratch)):
        out[i] = t
    return out


def rounded_momentum_(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                      momentum: float, nesterov: bool, decay: Decay, scratch: Scratch) -> list[torch.Tensor]:
    """Momentum of low-precision buffers in fp32: ``w ← fp32(buf)``; ``w ← w.lerp(g, 1 − μ)``;
    ``buf ← round(w)``; the NS input (``g.lerp(w, μ)`` with Nesterov, else ``w``, both from the
    unrounded ``w``) is written into the (fp32) gradient's storage, so the scratch is free again
    before orthogonalization starts."""
    grads = [g if g.dtype == WORK_DTYPE else g.to(WORK_DTYPE) for g in grads]
    pieces = pieces_of(list(zip(bufs, grads)), WORK_DTYPE.itemsize, scratch.budget)
    with scratch.active():
        for chunk in scratch.chunks([(tuple(b.shape),) for b, _ in pieces.tensors], WORK_DTYPE):
            work = [v[0] for v in chunk.views]
            b, g = (list(t) for t in zip(*pieces.tensors[chunk.start:chunk.stop]))
            torch._foreach_copy_(work, b)
            torch._foreach_lerp_(work, g, 1 - momentum)
            torch._foreach_copy_(b, work)
            if nesterov:
                torch._foreach_lerp_(g, work, momentum)
            else:
                torch._foreach_copy_(g, work)
    if not isinstance(decay, float) or decay != 1.0:
        torch._foreach_mul_(params, decay)
    return grads


@dataclass(frozen=True)
class Pieces:
    """Members' tensors cut into pieces whose working copies fit the budget: ``tensors[i]`` are
    matching (flat) views of one member's tensors, ``owner[i]`` that member."""

    tensors: tuple[tuple[torch.Tensor, ...], ...]
    owner: tuple[int, ...]


def pieces_of(members: Sequence[Sequence[torch.Tensor]], bytes_per_element: int, budget: int) -> Pieces:
    """Elementwise updates may run on parts of a tensor: a member whose working copies
    (``bytes_per_element`` per element) exceed the budget is cut into flat slices that fit (when
    its tensors are contiguous), so the scratch never holds a whole embedding's fp32 moments."""
    tensors, owner = [], []
    for i, ts in enumerate(members):
        n = ts[0].numel()
        parts = -(-n * bytes_per_element // max(1, budget))
        if parts <= 1 or not all(t.is_contiguous() for t in ts):
            tensors.append(tuple(ts))
            owner.append(i)
            continue
        size = -(-n // parts)
        flats = [t.view(-1) for t in ts]
        for a in range(0, n, size):
            tensors.append(tuple(f[a:a + size] for f in flats))
            owner.append(i)
    return Pieces(tuple(tensors), tuple(owner))


def momentum_one_(buf: torch.Tensor, grad: torch.Tensor, momentum: float, nesterov: bool,
                  param: torch.Tensor) -> torch.Tensor:
    """One tensor's momentum (Muown's direction), rounded state included; returns the NS input."""
    if not rounds(buf, param):
        grad = grad.to(buf.dtype)
        buf.lerp_(grad, 1 - momentum)
        return grad.lerp(buf, momentum) if nesterov else buf
    work = buf.to(WORK_DTYPE)
    grad = grad.to(WORK_DTYPE)
    work.lerp_(grad, 1 - momentum)
    buf.copy_(work)
    return grad.lerp(work, momentum) if nesterov else work


# ----------------------------------------------------------------------------- AdamW


def group_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], scratch: Scratch, *,
                 beta1: float, beta2: float, lr: float, weight_decay: float, eps: float) -> None:
    """torch's AdamW (foreach) on local tensors. Moments in another dtype than their parameter are
    updated on working copies in ``work_dtype`` (parameters too when narrower) and rounded back:
    exactly ``torch.optim.AdamW`` on the working copies."""
    hyper = dict(foreach=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
                 eps=eps, maximize=False)
    converted = [i for i, (p, m) in enumerate(zip(params, exp_avgs)) if m.dtype != p.dtype]
    plain = [i for i in range(len(params)) if i not in set(converted)]
    if plain:
        p = [params[i] for i in plain]
        adamw_functional(p, in_dtypes_of([grads[i] for i in plain], p), [exp_avgs[i] for i in plain],
                         [exp_avg_sqs[i] for i in plain], [], [steps[i] for i in plain], **hyper)
    for param_dtype in dict.fromkeys(params[i].dtype for i in converted):
        _converted_adamw_([i for i in converted if params[i].dtype == param_dtype], params, grads, exp_avgs,
                          exp_avg_sqs, steps, scratch, hyper)


def _converted_adamw_(members: list[int], params, grads, exp_avgs, exp_avg_sqs, steps, scratch: Scratch,
                      hyper: dict) -> None:
    """AdamW on working copies of one parameter dtype's members, a budget's worth at a time."""
    # foreach AdamW needs one dtype: fp32, unless something is wider
    dtype = work_dtype(params[members[0]].dtype, *(exp_avgs[i].dtype for i in members))
    cast_params = params[members[0]].dtype != dtype
    g_work = {i: grads[i] if grads[i].dtype == dtype else grads[i].to(dtype) for i in members}
    pieces = pieces_of([(params[i], g_work[i], exp_avgs[i], exp_avg_sqs[i]) for i in members],
                       (3 if cast_params else 2) * dtype.itemsize, scratch.budget)
    # torch's AdamW advances every step tensor it is given: a member's first piece uses its own, the
    # others a copy of it (taken before the step), so each member's step advances once
    seen: set[int] = set()
    piece_steps = []
    for k in pieces.owner:
        step = steps[members[k]]
        piece_steps.append(step if k not in seen else step.clone())
        seen.add(k)
    units = [((tuple(t[0].shape),) * (3 if cast_params else 2)) for t in pieces.tensors]
    with scratch.active():
        for chunk in scratch.chunks(units, dtype):
            p, g, m, v = (list(t) for t in zip(*pieces.tensors[chunk.start:chunk.stop]))
            m_w, v_w = [views[0] for views in chunk.views], [views[1] for views in chunk.views]
            p_w = [views[2] for views in chunk.views] if cast_params else p
            cast = (p_w, p) if cast_params else ([], [])
            torch._foreach_copy_(m_w + v_w + cast[0], m + v + cast[1])
            adamw_functional(p_w, g, m_w, v_w, [], piece_steps[chunk.start:chunk.stop], **hyper)
            torch._foreach_copy_(m + v + cast[1], m_w + v_w + cast[0])
