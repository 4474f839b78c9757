"""CPU/gloo shims that let torchtitan 0.3.0's stock Trainer run without a GPU.

The 0.3.0 counterpart of ``launch/cpu_shims.py`` (torchtitan 0.2.2), with the same rules:

* every shim is a small function below whose docstring says WHY it exists;
* shims are only ever activated when no CUDA (nor any other accelerator) is available
  (``activate`` refuses otherwise), so GPU runs execute torchtitan unmodified;
* each shim changes behaviour only for the CPU case it fixes.

The shims that patch torch alone (not torchtitan) are the 0.2.2 ones, reused from there.
The set is the minimal one found by running the stock ``llama3_debugmodel`` and
``deepseek_v3_debugmodel`` configs on 2-4 CPU ranks (FSDP, TP, HSDP, EP, PP, DDP;
checkpoint save and resume) with every ``parallelism.spmd_backend``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from launch.cpu_shims import (
    ShimSet, _CPUMemoryMonitor, _CPUWithDeviceIndex, cpu_shims_needed, fsdp_sum_only_reductions,
)

__all__ = ["activate", "active_shims", "cpu_shims_needed"]

# --------------------------------------------------------------------------- shims


def device_type_cpu() -> None:
    """torchtitan picks its device with ``_get_available_device_type() or "cuda"``
    (``torchtitan.tools.utils.get_device_info``).

    With no accelerator that falls back to "cuda" and the Trainer dies in
    ``torch.cuda.set_device`` ("module 'torch._C' has no attribute '_cuda_setDevice'").
    Rebind the module-level ``device_type`` / ``device_module`` globals (copied into
    several modules at import) to CPU; with ``device_type == "cpu"`` torchtitan also
    selects the gloo backend (``default_device_backend_map["cpu"]``).
    """
    import torchtitan.components.metrics
    import torchtitan.distributed.parallel_dims
    import torchtitan.distributed.utils
    import torchtitan.models.common.token_dispatcher
    import torchtitan.tools.profiler
    import torchtitan.tools.utils

    modules = (
        torchtitan.tools.utils,
        torchtitan.components.metrics,
        torchtitan.distributed.parallel_dims,
        torchtitan.distributed.utils,
        torchtitan.models.common.token_dispatcher,
        torchtitan.tools.profiler,
    )
    for module in modules:
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = torch.cpu


def barrier_device_id() -> None:
    """After step 1 torchtitan's ``set_pg_timeouts`` calls
    ``barrier(device_ids=[device_module.current_device()])``. ``torch.cpu.current_device()``
    returns the string "cpu", which ``BarrierOptions.device_ids`` rejects (it wants ints);
    gloo accepts and ignores an integer id, so hand that module an index of 0."""
    import torchtitan.distributed.utils as dist_utils

    dist_utils.device_module = _CPUWithDeviceIndex()


def device_memory_monitor() -> None:
    """``torch.cpu`` has no ``get_device_name`` / ``get_device_properties`` /
    ``memory_stats`` / ``reset_peak_memory_stats``, which torchtitan's
    DeviceMemoryMonitor calls at start-up and every logged step. Report the
    process's peak RSS instead (the 0.2.2 shim's monitor)."""
    import torchtitan.components.metrics as metrics

    metrics.build_device_memory_monitor = _CPUMemoryMonitor


def _eager_flex_attention(query, key, value, *, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                          return_aux=None, kernel_options=None):
    """``flex_attention``'s result computed by torch's own eager reference (``math_attention``, what the
    flex higher-order op runs for CPU tensors without grad), through ordinary differentiable ops."""
    import math

    from torch._higher_order_ops.flex_attention import math_attention
    from torch.nn.attention import flex_attention as fa

    if block_mask is None:
        block_mask = fa._create_empty_block_mask(query, key)
    if not enable_gqa and query.size(-3) != key.size(-3):
        raise ValueError(f"query has {query.size(-3)} heads, key/value {key.size(-3)}; GQA needs enable_gqa=True")
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    out, lse, max_scores = math_attention(query, key, value, score_mod or fa._identity, block_mask.as_tuple(),
                                          scale, kernel_options or {})
    # math_attention returns lse / max in base-2 units (the kernels' convention); flex_attention's are natural.
    lse, max_scores = lse * math.log(2), max_scores * math.log(2)
    if return_aux is None:
        return out
    return out, fa.AuxOutput(lse=lse if return_aux.lse else None,
                             max_scores=max_scores if return_aux.max_scores else None)


def flex_attention_eager_cpu() -> None:
    """The 0.3.0 language models have no eager attention backend (sdpa was removed; "flex" is
    the default, "varlen" is CUDA-only), and torch's ``flex_attention`` refuses CPU tensors that
    need grad ("FlexAttention does not support backward on CPU"), compiled or not.

    For CPU inputs, run torchtitan's ``FlexAttention._compiled_flex_attn`` as torch's eager
    reference implementation instead: the same masks (``block_mask.mask_mod``), score mods, GQA and
    lse, as plain differentiable ops. Fine for the tiny debug runs; O(L^2) memory, no block sparsity.
    Non-CPU inputs still go to the compiled kernel.
    """
    from torchtitan.models.common.attention import FlexAttention

    compiled = FlexAttention._compiled_flex_attn

    @functools.wraps(compiled)
    def flex(query, key, value, **kwargs):
        if query.device.type == "cpu":
            return _eager_flex_attention(query, key, value, **kwargs)
        return compiled(query, key, value, **kwargs)

    FlexAttention._compiled_flex_attn = staticmethod(flex)


def block_mask_eager_cpu() -> None:
    """torchtitan builds every flex ``BlockMask`` with ``torch.compile(create_block_mask)``. On CPU
    that compile costs each process ~9 s of CPU (dynamo + inductor, on every start: its cache is
    per process) for masks of a few thousand elements, which eager ``create_block_mask`` builds in
    milliseconds, identically (same mask_mod, block size and full-block split). CPU devices only;
    other devices keep the compiled builder."""
    from torchtitan.models.common import attention

    compiled = attention._compiled_create_block_mask

    @functools.wraps(compiled)
    def create(*args, **kwargs):
        device = kwargs.get("device")  # None: the default device, the CPU where these shims are active
        if device is None or torch.device(device).type == "cpu":
            return attention.create_block_mask(*args, **kwargs)
        return compiled(*args, **kwargs)

    attention._compiled_create_block_mask = create


def process_group_set_timeout() -> None:
    """torchtitan 0.3.0 targets torch 2.14, whose public ``torch.distributed.set_timeout(timeout,
    group)`` it calls after step 1 (``set_pg_timeouts``: switch to ``comm.train_timeout_seconds``).
    torch 2.13 has the same function as ``distributed_c10d._set_pg_timeout`` (gloo and NCCL groups);
    expose it under the new name, only where it is missing."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = distributed_c10d._set_pg_timeout


SHIMS: tuple[Callable[[], None], ...] = (
    device_type_cpu,
    barrier_device_id,
    device_memory_monitor,
    fsdp_sum_only_reductions,
    flex_attention_eager_cpu,
    block_mask_eager_cpu,
    process_group_set_timeout,
)
_SHIM_SET = ShimSet(SHIMS)
activate, active_shims = _SHIM_SET.activate, _SHIM_SET.active
