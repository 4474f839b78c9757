"""Parameter layouts for multi-process tests, and the single-process reference they must equal.

Every builder returns ``Entry``s: a full tensor (the single-process truth), the param-group
options, and how to turn the full tensor into this rank's (possibly DTensor) parameter.
Functions here run inside the gloo worker processes of ``harness.DistributedPool``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import dist_muon as dm


@dataclass
class Entry:
    name: str
    param: torch.Tensor  # this rank's parameter (DTensor or plain)
    full: torch.Tensor  # the whole tensor, identical on every rank
    options: dict = field(default_factory=dict)


def seeded(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _fill_module(module: nn.Module, seed: int, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    fulls = {}
    for i, (name, shape) in enumerate(shapes.items()):
        fulls[name] = seeded(shape, seed + i)
        module.register_parameter(name, nn.Parameter(fulls[name].clone()))
    return fulls


def fsdp_entries(world: int, seed: int = 1) -> list[Entry]:
    """fully_shard on a 1-D mesh: divisible and non-divisible dims, empty shards, fused views."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    shapes = {
        "dense": (12, 16), "odd": (6, 10), "tiny": (3, 8), "qkv": (20, 16), "fused_experts": (18, 8),
        "heads": (12, 8), "experts3d": (4, 6, 8), "conv": (6, 2, 3, 3), "norm": (16,), "muown": (10, 12),
        "muown_experts": (2, 5, 6), "tall": (14, 5), "wqkv_interleaved": (27, 8), "conv1d": (6, 4, 3),
    }
    options = {
        "qkv": {"split_sizes": (12, 4, 4)}, "fused_experts": {"num_experts": 3}, "heads": {"num_heads": 3},
        "norm": {"algorithm": "adamw"}, "muown": {"algorithm": "muown"}, "muown_experts": {"algorithm": "muown"},
        # 3 KV groups of (q, k, v) head_dim-3 rows: shards of 27 rows cut through blocks at W=2 and 4.
        "wqkv_interleaved": {"split_sizes": (3, 3, 3), "interleave": 3}, "conv1d": {"flatten": True},
    }
    module = nn.Module()
    fulls = _fill_module(module, seed, shapes)
    fully_shard(module, mesh=mesh)
    return [Entry(f"fsdp.{n}", getattr(module, n), fulls[n], options.get(n, {})) for n in shapes]


def hsdp_entries(world: int, seed: int = 100) -> list[Entry]:
    """HSDP: replicate × shard mesh; replicas split the Newton–Schulz work."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    shapes = {"w1": (12, 10), "w2": (7, 12), "experts": (3, 4, 6), "bias": (7,), "muown": (6, 9)}
    options = {"bias": {"algorithm": "adamw"}, "muown": {"algorithm": "muown"}}
    module = nn.Module()
    fulls = _fill_module(module, seed, shapes)
    fully_shard(module, mesh=mesh)
    return [Entry(f"hsdp.{n}", getattr(module, n), fulls[n], options.get(n, {})) for n in shapes]


_TP_PLAN = {"up": ColwiseParallel(), "down": RowwiseParallel(), "qkv": ColwiseParallel(),
            "gate": ColwiseParallel(), "proj": RowwiseParallel(), "muown_up": ColwiseParallel(),
            "wqkv": ColwiseParallel()}


class _TPBlock(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        shapes = {"up": (10, 12), "down": (12, 10), "qkv": (10, 16), "gate": (10, 12), "proj": (12, 10),
                  "muown_up": (10, 12), "wqkv": (10, 12)}
        for i, (name, (fan_in, fan_out)) in enumerate(shapes.items()):
            setattr(self, name, nn.Linear(fan_in, fan_out, bias=False))
            getattr(self, name).weight.data.copy_(seeded((fan_out, fan_in), seed + i))


_TP_OPTIONS = {"qkv.weight": {"split_sizes": (8, 4, 4)}, "gate.weight": {"algorithm": "adamw"},
               "proj.weight": {"algorithm": "muown"}, "muown_up.weight": {"algorithm": "muown"},
               "wqkv.weight": {"split_sizes": (2, 2, 2), "interleave": 2}}


def tp_entries(world: int, seed: int = 200) -> list[Entry]:
    """FSDP over TP: colwise (→ _StridedShard under FSDP) and rowwise, a colwise fused QKV (plain
    and interleaved: TP holds whole KV groups, FSDP cuts each in the middle of K), and AdamW / Muown parameters
    on both (Muown's row norms span the TP-sharded dim for rowwise)."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    block = _TPBlock(seed)
    fulls = {n: p.detach().clone() for n, p in block.named_parameters()}
    parallelize_module(block, mesh["tp"], _TP_PLAN)
    fully_shard(block, mesh=mesh["dp"])
    return [Entry(f"tp.{n}", p, fulls[n], _TP_OPTIONS.get(n, {})) for n, p in block.named_parameters()]


def tp_only_entries(world: int, seed: int = 250) -> list[Entry]:
    """Tensor parallel alone on a 1-D mesh of every rank (colwise, rowwise, fused and interleaved QKV)."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    block = _TPBlock(seed)
    fulls = {n: p.detach().clone() for n, p in block.named_parameters()}
    parallelize_module(block, mesh, _TP_PLAN)
    return [Entry(f"tp.{n}", p, fulls[n], _TP_OPTIONS.get(n, {})) for n, p in block.named_parameters()]


def ep_entries(world: int, seed: int = 300) -> list[Entry]:
    """Experts on their own ('efsdp', 'ep') mesh: sharded on the expert dim (no traffic) and on a matrix dim."""
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("efsdp", "ep"))
    cases = {
        "experts_whole": ((4, 6, 8), [Shard(0), Shard(0)], {}),
        "experts_rows": ((2, 6, 8), [Shard(1), Shard(0)], {}),
        "experts_cols_ep_replicated": ((2, 8, 6), [Shard(2), Replicate()], {}),
        "experts_muown_cols": ((2, 6, 8), [Shard(2), Shard(0)], {"algorithm": "muown"}),
        "experts_adamw": ((4, 6, 8), [Shard(1), Shard(0)], {"algorithm": "adamw"}),
        # rows of each expert: 3 repeats of (1, 2); efsdp cuts 9 rows at 5, inside the second repeat's block of 2
        "experts_interleaved": ((2, 9, 8), [Shard(1), Shard(0)], {"split_sizes": (1, 2), "interleave": 3}),
    }
    out = []
    for i, (name, (shape, placements, options)) in enumerate(cases.items()):
        full = seeded(shape, seed + i)
        param = nn.Parameter(distribute_tensor(full.clone(), mesh, placements))
        out.append(Entry(f"ep.{name}", param, full, options))
    return out


def kitchen_sink(world: int) -> list[Entry]:
    return fsdp_entries(world) + hsdp_entries(world) + tp_entries(world) + ep_entries(world)


def ddp_entries(world: int, seed: int = 400) -> list[Entry]:
    shapes = {"w": (12, 10), "v": (5, 20), "experts": (3, 4, 6), "b": (5,), "muown": (8, 6)}
    options = {"b": {"algorithm": "adamw"}, "muown": {"algorithm": "muown"}}
    out = []
    for i, (n, shape) in enumerate(shapes.items()):
        full = seeded(shape, seed + i)
        out.append(Entry(f"ddp.{n}", nn.Parameter(full.clone()), full, options.get(n, {})))
    return out


# --------------------------------------------------------------------------- running and comparing


def groups_for(entries: list[Entry], params: list[torch.Tensor], common: dict) -> list[dict]:
    groups = []
    for e, p in zip(entries, params):
        options = {**common, **e.options}
        options.setdefault("algorithm", "muon" if e.full.ndim >= 2 else "adamw")
        groups.append({"params": [p], "param_names": [e.name], **options})
    return groups


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements)
    return full.clone()


def full_of(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_both(
    entries: list[Entry], *, steps: int = 3, common: Optional[dict] = None, process_group=None,
    updates: Optional[list] = None, grad_dtype: Optional[torch.dtype] = None, **opt_kwargs
):
    """Step the distributed params and a single-process copy with identical gradients.

    Gradients are drawn in fp32 and cast to the parameter's dtype, or to ``grad_dtype`` when given
    (then both sides' ``grad_dtype`` attribute is set so torch accepts the mismatch). With
    ``updates`` (a list), each step appends {name: (distributed update, reference update, reference
    parameter after the step)}, full tensors in fp64, updates being ``p_after - p_before``
    (see ``update_errors``).
    Returns (distributed optimizer, reference optimizer, reference params).
    """
    common = {} if common is None else common
    reference = [nn.Parameter(e.full.clone()) for e in entries]
    dist_params = [e.param for e in entries]
    if grad_dtype is not None:
        for p in dist_params + reference:
            p.grad_dtype = grad_dtype
    opt = dm.DistMuon(groups_for(entries, dist_params, common), process_group=process_group, **opt_kwargs)
    ref = dm.DistMuon(groups_for(entries, reference, common), **opt_kwargs)
    for step in range(steps):
        for i, (e, p, r) in enumerate(zip(entries, dist_params, reference)):
            g = seeded(e.full.shape, 10_000 * (step + 1) + i).to(grad_dtype or e.full.dtype)
            r.grad = g.clone()
            p.grad = _shard_like(g, p)
        before = _fulls(entries, reference) if updates is not None else None
        opt.step()
        ref.step()
        if updates is not None:
            after = _fulls(entries, reference)
            updates.append({name: (a[0] - b[0], a[1] - b[1], a[1])
                            for (name, a), b in zip(after.items(), before.values())})
    return opt, ref, reference


def _fulls(entries, reference) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {e.name: (full_of(e.param.detach()).double(), r.detach().double()) for e, r in zip(entries, reference)}


def relative_errors(entries, opt, ref, reference) -> dict[str, float]:
    """Max relative error per parameter and per state tensor, distributed vs reference."""
    errors = {}
    for e, r in zip(entries, reference):
        errors[e.name] = _rel(full_of(e.param.detach()), r.detach())
        for key, value in opt.state[e.param].items():
            if isinstance(value, torch.Tensor) and value.ndim:
                errors[f"{e.name}:{key}"] = _rel(full_of(value), ref.state[r][key])
    return errors


def update_errors(entries, opt, ref, reference, updates) -> dict[str, float]:
    """Per parameter, the worst step's ``‖Δ_dist − Δ_ref‖ / ‖Δ_ref‖`` with Δ = p_after − p_before;
    per state tensor, the relative error of its final value (as ``relative_errors``).

    A parameter compared to its own norm hides errors in the update: after one step with lr 0.05 a
    1e-2 tolerance on the parameter is several percent of the update.
    """
    errors = {}
    for step in updates:
        for name, (d, r, _) in step.items():
            if not r.any() and not d.any():
                continue  # nothing moved on either side (e.g. lr 0): nothing to compare
            errors[name] = max(errors.get(name, 0.0), _rel(d, r))
    for e, r in zip(entries, reference):
        for key, value in opt.state[e.param].items():
            if isinstance(value, torch.Tensor) and value.ndim:
                errors[f"{e.name}:{key}"] = _rel(full_of(value), ref.state[r][key])
    return errors


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
