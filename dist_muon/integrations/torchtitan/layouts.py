"""torchtitan 0.3.0: refusing parameters whose sharding DTensor does not describe.

DistMuon reads every layout from DTensor placements; a plain tensor is, to it, the whole parameter
(or a DDP-style replica). Under ``parallelism.spmd_backend = "spmd_types"`` torchtitan 0.3.0 makes
parameters plain *local* tensors and records their sharding only in spmd_types' per-tensor
annotation (the ``_local_type`` attribute: one of R, I, V, P per mesh axis). FSDP2 of torch 2.14
turns such parameters into DTensors on its storage mesh (placements from the annotation), which
DistMuon reads like any other; a plain parameter that is still Varying or Partial over a mesh axis
of size > 1 when the optimizer is built is a shard (or a partial sum) posing as a whole matrix, and
orthogonalizing it would be silently wrong. Such parameters are refused, naming the parameter, the
backend and what to use instead. (With torch 2.13, torchtitan's own FSDP setup already refuses
spmd_types parameters on more than one rank; see docs/torchtitan.md.)
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.tensor import DTensor

import dist_muon as dm

# spmd_types' per-axis local types that mean "this rank's data is the whole tensor on that axis":
# Replicate (R) and Invariant (I). Varying (V: a shard) and Partial (P: a summand) do not.
_WHOLE_ON_AXIS = ("R", "I")
_LOCAL_TYPE = "_local_type"  # where spmd_types keeps a tensor's annotation (spmd_types._type_attr)


def unsharded_local_axes(param) -> list[str]:
    """The mesh axes (size > 1) on which a plain parameter holds a shard or a partial value."""
    if isinstance(param, DTensor):
        return []
    local_type = getattr(param, _LOCAL_TYPE, None) or {}
    return [str(axis) for axis, kind in local_type.items()
            if _axis_size(axis) > 1 and getattr(kind, "value", str(kind)) not in _WHOLE_ON_AXIS]


def _axis_size(axis) -> int:
    size = getattr(axis, "size", None)
    return int(size()) if callable(size) else 1


def check_parameter_layouts(part: nn.Module, backend: str = "spmd_types") -> None:
    """Raise ValueError for any trainable parameter whose local tensor is not the whole parameter
    although it is not a DTensor (see the module docstring)."""
    for name, param in part.named_parameters():
        axes = unsharded_local_axes(param) if param.requires_grad else []
        if axes:
            raise ValueError(
                f"{dm.canonical_fqn(name)}: a plain local tensor of shape {tuple(param.shape)} that spmd_types "
                f"marks as sharded or partial over mesh axes {axes} (parallelism.spmd_backend={backend!r}); "
                "DistMuon reads layouts from DTensor placements and would take this shard for the whole matrix. "
                "Use --parallelism.spmd_backend full_dtensor (or partial_dtensor), whose parameters are DTensors."
            )


def check_backend(spmd_backend: str, world_size: int) -> None:
    """At parse time: the spmd_types backend on more than one rank needs torch >= 2.14.

    torch 2.13's FSDP2 takes only DTensor parameters on an SPMD mesh, so torchtitan fails while
    building the model ("all parameters must be DTensors on the full SPMD mesh ... Got plain tensor
    for parameter 'weight'"); say which setting to change before any process group exists.
    """
    import torch

    from .options import ConfigError

    if spmd_backend == "spmd_types" and world_size > 1 and _torch_version() < (2, 14):
        raise ConfigError(
            f"[parallelism] spmd_backend: 'spmd_types' keeps parameters as plain local shards, which FSDP2 of "
            f"torch {torch.__version__} cannot shard on {world_size} ranks (torch >= 2.14 can); use "
            "--parallelism.spmd_backend full_dtensor (or partial_dtensor)")


def _torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)
