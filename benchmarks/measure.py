"""Measuring a step from the outside: dispatched ops, host syncs and transient memory.

Nothing here asks the optimizer about itself. Ops are counted by a ``TorchDispatchMode`` (each
dispatched aten op is at least one kernel launch on a GPU). Memory comes from the allocator:
on CUDA its peak; on CPU the profiler's record of every allocation and free made through
torch's CPU allocator (storage resizes included), summed in time order.
"""

from __future__ import annotations

import collections
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(fn: Callable[[], object]) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def peak_transient_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated during ``fn`` above what was allocated when it started."""
    return retained_and_peak_bytes(fn, device)[1]


def retained_and_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, int]:
    """(bytes still allocated after ``fn`` that were not before, peak bytes above the start during it),
    from the allocator: what ``fn`` keeps (e.g. an optimizer's eagerly created state) and what it
    needed at most on the way."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) - base, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return live, peak
