"""CPU/gloo shims that let torchtitan 0.2.2's real Trainer run without a GPU.

torchtitan assumes an accelerator. To test the optimizer end to end on CPU
(CI, laptops) we patch the few places where that assumption breaks. Rules:

* every shim is a small function below whose docstring says WHY it exists;
* shims are only ever activated when CUDA is NOT available (``activate``
  refuses otherwise), so GPU runs execute torchtitan unmodified;
* each shim changes behaviour only for the CPU case it fixes.

The set is the minimal one found by running the llama3 and deepseek_v3 debug
configs (FSDP, expert parallel, checkpoint save/resume) on 2 CPU ranks.
"""

from __future__ import annotations

import functools
import os
import resource
from typing import Callable

import torch

def cpu_shims_needed() -> bool:
    """True when torchtitan finds no accelerator (no CUDA, nor any other), i.e. CPU + gloo."""
    from torch._utils import _get_available_device_type  # what torchtitan's device choice uses

    return not torch.cuda.is_available() and _get_available_device_type() is None


class ShimSet:
    """Shims applied at most once per process, and never when an accelerator is available."""

    def __init__(self, shims: tuple[Callable[[], None], ...]):
        self.shims = shims
        self._active: list[str] = []

    def active(self) -> list[str]:
        return list(self._active)

    def activate(self) -> list[str]:
        """Apply every shim once; returns their names."""
        if not cpu_shims_needed():
            raise RuntimeError("CPU shims must not be activated when CUDA (or another accelerator) is available")
        if not self._active:
            for shim in self.shims:
                shim()
                self._active.append(shim.__name__)
        return self.active()


# --------------------------------------------------------------------------- shims


def device_type_cpu() -> None:
    """torchtitan picks its device with ``_get_available_device_type() or "cuda"``.

    With no accelerator that falls back to "cuda" and the Trainer dies in
    ``torch.cuda.set_device``. Rebind the module-level ``device_type`` /
    ``device_module`` globals (copied into several modules at import) to CPU;
    with ``device_type == "cpu"`` torchtitan also selects the gloo backend.
    """
    import torchtitan.components.metrics
    import torchtitan.distributed.parallel_dims
    import torchtitan.distributed.utils
    import torchtitan.tools.profiling
    import torchtitan.tools.utils

    modules = (
        torchtitan.tools.utils,
        torchtitan.components.metrics,
        torchtitan.distributed.parallel_dims,
        torchtitan.distributed.utils,
        torchtitan.tools.profiling,
    )
    for module in modules:
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = torch.cpu


class _CPUWithDeviceIndex:
    """``torch.cpu`` whose ``current_device()`` is the index 0 instead of the string "cpu"."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0


def barrier_device_id() -> None:
    """After step 1 torchtitan's ``set_pg_timeouts`` calls
    ``barrier(device_ids=[device_module.current_device()])``. ``torch.cpu.current_device()``
    returns the string "cpu", which ``BarrierOptions.device_ids`` rejects (it wants ints);
    gloo accepts and ignores an integer id, so hand that module an index of 0."""
    import torchtitan.distributed.utils as dist_utils

    dist_utils.device_module = _CPUWithDeviceIndex()


class _CPUMemoryMonitor:
    """Stand-in for torchtitan's DeviceMemoryMonitor, reporting host RSS instead."""

    def __init__(self) -> None:
        self.device_name = "cpu"
        self.device_capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.device_capacity_gib = self.device_capacity / 2**30

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        # ru_maxrss is in KiB on Linux.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        gib, pct = peak / 2**30, 100 * peak / self.device_capacity
        return DeviceMemStats(gib, pct, gib, pct, 0, 0)

    def reset_peak_stats(self) -> None:
        pass


def device_memory_monitor() -> None:
    """``torch.cpu`` has no ``get_device_name`` / ``get_device_properties`` /
    ``memory_stats`` / ``reset_peak_memory_stats``, which torchtitan's
    DeviceMemoryMonitor calls at start-up and every logged step. Report the
    process's peak RSS instead."""
    import torchtitan.components.metrics as metrics

    metrics.build_device_memory_monitor = _CPUMemoryMonitor


def fsdp_sum_only_reductions() -> None:
    """gloo has no ``PREMUL_SUM`` (nor ``AVG``) reduce op.

    torchtitan sets a custom FSDP gradient divide factor (1.0: it normalises by
    the global token count itself), which FSDP2 turns into a ``PREMUL_SUM``
    reduce-scatter. FSDP's own "force sum reduction for comms" mode (always on for
    MTIA) uses plain SUM and scales locally instead: same gradients, gloo-friendly.
    """
    import inspect

    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    original = collectives._get_gradient_divide_factors
    signature = inspect.signature(original)

    @functools.wraps(original)
    def sum_only(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["force_sum_reduction_for_comms"] = True
        return original(*bound.args, **bound.kwargs)

    collectives._get_gradient_divide_factors = sum_only


def integer_histc() -> None:
    """torchtitan's MoE router counts tokens per expert with ``torch.histc`` on the
    int64 expert indices. CUDA's histc takes integer tensors; the CPU kernel raises
    ``"histogram_cpu" not implemented for 'Long'``. For such inputs (only those:
    every other call goes straight to torch) count in float32, which is exact for
    integer values and these bin edges, and return the input's dtype like CUDA."""
    original = torch.histc

    @functools.wraps(original)
    def histc(input, *args, **kwargs):
        if input.is_floating_point() or input.device.type != "cpu" or "out" in kwargs:
            return original(input, *args, **kwargs)
        return original(input.float(), *args, **kwargs).to(input.dtype)

    torch.histc = histc


def moe_permute_indices_cpu() -> None:
    """With expert parallelism torchtitan permutes tokens with a Triton kernel
    (``fill_indices_wrapper``); Triton has no CPU driver ("0 active drivers").
    torchtitan ships the same computation as ``fill_indices_cpu`` (its reference,
    selected by ``generate_permute_indices(use_cpu=True)``), so route CPU tensors
    there. ``generate_permute_indices`` looks the wrapper up at call time."""
    from torchtitan.models.moe import kernels

    triton_fill = kernels.fill_indices_wrapper

    @functools.wraps(triton_fill)
    def fill_indices(tokens_per_expert_group, *args, **kwargs):
        if tokens_per_expert_group.device.type == "cpu":
            return kernels.fill_indices_cpu(tokens_per_expert_group, *args, **kwargs)
        return triton_fill(tokens_per_expert_group, *args, **kwargs)

    kernels.fill_indices_wrapper = fill_indices


SHIMS: tuple[Callable[[], None], ...] = (
    device_type_cpu,
    barrier_device_id,
    device_memory_monitor,
    fsdp_sum_only_reductions,
    integer_histc,
    moe_permute_indices_cpu,
)
_SHIM_SET = ShimSet(SHIMS)
activate, active_shims = _SHIM_SET.activate, _SHIM_SET.active
