"""Side by side with torchtitan 0.3.0's built-in DistMuon: which layouts each optimizer takes, and the step.

    DIST_MUON_TT030_ENV=<dir> torchrun --nproc_per_node 2 -m benchmarks.builtin_distmuon --json out.json
    # 4 ranks add the HSDP, FSDP + TP and 2-D expert-mesh rows (on 2 cores too, just slower):
    DIST_MUON_TT030_ENV=<dir> torchrun --nproc_per_node 4 -m benchmarks.builtin_distmuon --json out.json

``<dir>`` holds torchtitan 0.3.0 (``pip install --no-deps --target <dir> torchtitan==0.3.0 spmd_types
torch_checkpointing``; its other dependencies come from this environment). It is found from
``--tt030-env``, else ``$DIST_MUON_TT030_ENV``, else ``launch.torchtitan030_env.ensure_env()`` when that
module exists; it goes first on ``sys.path`` so ``torchtitan`` is 0.3.0 in these processes only.
Run from the repository root (``-m`` puts it on the path; the reference comes from ``tests/reference.py``).

**Feature probes** (every run). Each row builds the same small parameters on every rank, in the row's
layout (FSDP2 ``fully_shard``, HSDP, ``parallelize_module`` TP, FSDP over TP, expert DTensors, plain
tensors), and tries both optimizers with the same hyperparameters (lr 0.02, momentum 0.95, Nesterov,
weight decay 0.01, quintic NS, 5 steps, ``sqrt(max(1, m/n))`` scale):

- ours: ``dist_muon.DistMuon`` with fp32 NS, one step, compared with the fp64 reference of the update
  rule (``tests/reference.py``; ``torch.optim.AdamW`` in fp64 for AdamW parameters): the max over
  parameters of ``‖Δ − Δ_ref‖ / ‖Δ_ref‖``, Δ being the parameter's change;
- built-in: ``build_dist_muon`` with the ``ComputeLayout``/``BucketConfig`` its documentation asks for
  that layout (``Owned()`` on the sharded axis for a whole matrix, ``BlockShard(dim=0, block_size=R)``
  for row-stacked blocks, ``Shard(0)`` on the expert axes for batch-first experts, one bucket).
  On CUDA its step runs and is compared with the same reference (it always runs NS in bf16).
  Without CUDA its constructor raises "DistMuon requires one CUDA device per process" before it looks
  at any layout; that is recorded as the outcome, and a second construction then runs with ONLY that
  check replaced (``DistMuon._validate_parameter_storage`` patched to accept one local CPU device,
  everything else untouched), so its layout validation and planning run and say which layouts it
  accepts or refuses, in its own words. Its step is never run on CPU ("step: skipped (CUDA only)").

**Step benchmark** (CUDA only): both optimizers on ``benchmarks.gpu``'s Llama-like and MoE stacks, the
matrices DTensors ``Shard(0)`` over all ranks, bf16 quintic NS for both: median ms/step
(``benchmarks.gpu._time_ms``; with W > 1 each step ends in a barrier, so it is the slowest rank's),
transient memory of one step (the CUDA allocator's peak above the memory before it,
``benchmarks.measure``), and the ratio. Without CUDA it is recorded as skipped with the built-in's
measured error.

Rank 0 prints a markdown table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import dist_muon as dm
from tests.reference import POLAR_EXPRESS, muon_step64  # the fp64 rule (run from the repo root)

LR, ADAMW_LR, MOMENTUM, WEIGHT_DECAY, NS_STEPS = 0.02, 0.003, 0.95, 0.01, 5
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.95), 1e-8
EXACT = 1e-5  # DESIGN.md's sharding-invariance bound with fp32 NS
DEVICE_CHECK = "requires one CUDA device per process"  # the built-in's device refusal (its message's tail)


# --------------------------------------------------------------------------- the 0.3.0 environment


def torchtitan030_path(explicit: Optional[str]) -> Optional[str]:
    """Where torchtitan 0.3.0 lives: ``--tt030-env``, ``$DIST_MUON_TT030_ENV``, or ``ensure_env()``."""
    path = explicit or os.environ.get("DIST_MUON_TT030_ENV")
    if path:
        return os.path.abspath(path)
    try:
        from launch.torchtitan030_env import ensure_env
    except ModuleNotFoundError as e:
        if e.name not in ("launch", "launch.torchtitan030_env"):
            raise
        return None  # nothing to locate it with: torchtitan 0.3.0 may already be importable
    return os.path.abspath(str(ensure_env()))


def import_flex_shard(path: Optional[str]):
    """The built-in's module, from ``path`` put first on ``sys.path`` (before anything imports torchtitan)."""
    if path:
        if "torchtitan" in sys.modules and not sys.modules["torchtitan"].__file__.startswith(path):
            raise RuntimeError(f"torchtitan was imported from {sys.modules['torchtitan'].__file__} before the "
                               f"0.3.0 environment {path} could be put first on sys.path")
        sys.path.insert(0, path)
    try:
        from torchtitan.distributed import flex_shard
        from torchtitan.distributed.flex_shard import dist_muon as builtin_module
    except ImportError as e:
        raise SystemExit(
            "benchmarks.builtin_distmuon needs torchtitan 0.3.0 (torchtitan.distributed.flex_shard), "
            f"which is not importable here ({type(e).__name__}: {e}). Point DIST_MUON_TT030_ENV (or "
            "--tt030-env) at a `pip install --no-deps --target DIR torchtitan==0.3.0 spmd_types "
            "torch_checkpointing` directory.") from e
    return flex_shard, builtin_module


# --------------------------------------------------------------------------- probe definitions


def _seeded(shape, seed: int, std: float = 1.0) -> torch.Tensor:
    return std * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def whole(t):
    return [(slice(None), t)]


def experts(t):
    return [(i, t[i]) for i in range(t.shape[0])]


def row_blocks(*sizes):
    def matrices(t):
        out, start = [], 0
        for s in sizes:
            out.append((slice(start, start + s), t[start:start + s]))
            start += s
        return out
    return matrices


@dataclass
class Param:
    fqn: str
    shape: tuple
    matrices: Optional[Callable]  # the reference's view (index, matrix) pairs; None: an AdamW parameter
    ours: dict = field(default_factory=dict)  # our param-group options (split_sizes, num_heads, algorithm)
    layout: object = None  # the built-in's ComputeLayout for it
    group: int = 0  # index into Probe.groups (both optimizers)


@dataclass
class Probe:
    key: str
    feature: str
    layout: str  # the storage layout, in words
    params: list[Param]
    place: Callable[[list[torch.Tensor]], list[torch.Tensor]]  # full tensors -> this rank's parameters
    builtin_config: str  # what the built-in is given, in words
    groups: list[dict] = field(default_factory=lambda: [{}])  # hyperparameter overrides per group
    method: str = "quintic"
    builtin_kwargs: dict = field(default_factory=dict)
    process_group: bool = False  # ours: plain tensors replicated over the world (DDP style)
    alternatives: list = field(default_factory=list)  # (description, a layout per param): more built-in configs
    note: str = ""
    device: Optional[str] = None  # None: the run's device


class Ctx:
    def __init__(self, world: int, device: torch.device, fs):
        self.world, self.device, self.fs = world, device, fs
        self._meshes: dict = {}

    def mesh(self, shape: tuple, names: tuple, device: Optional[str] = None):
        device = device or self.device.type
        key = (device, shape, names)
        if key not in self._meshes:  # every rank creates the same meshes in the same order
            self._meshes[key] = init_device_mesh(device, shape, mesh_dim_names=names)
        return self._meshes[key]


def _fsdp(ctx: Ctx, shape: tuple, names: tuple, device: Optional[str] = None):
    from torch.distributed.fsdp import fully_shard

    def place(fulls):
        module = nn.Module()
        for i, t in enumerate(fulls):
            module.register_parameter(f"p{i}", nn.Parameter(t.clone().to(device or ctx.device)))
        fully_shard(module, mesh=ctx.mesh(shape, names, device))
        return [getattr(module, f"p{i}") for i in range(len(fulls))]
    return place


def _distribute(ctx: Ctx, shape: tuple, names: tuple, placements: list):
    def place(fulls):
        mesh = ctx.mesh(shape, names)
        return [nn.Parameter(distribute_tensor(t.to(ctx.device), mesh, placements)) for t in fulls]
    return place


def _tp(ctx: Ctx, styles: list[str], fsdp: bool):
    """nn.Linear weights under ``parallelize_module`` (and FSDP over it): torch's real TP placements."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def place(fulls):
        mesh = ctx.mesh((2, ctx.world // 2), ("dp_shard", "tp")) if fsdp else ctx.mesh((ctx.world,), ("tp",))
        tp_mesh = mesh["tp"] if fsdp else mesh
        module, plan = nn.Module(), {}
        for i, (t, style) in enumerate(zip(fulls, styles)):
            linear = nn.Linear(t.shape[1], t.shape[0], bias=False, device=ctx.device)
            linear.weight.data.copy_(t)
            module.add_module(f"l{i}", linear)
            plan[f"l{i}"] = ColwiseParallel() if style == "colwise" else RowwiseParallel()
        parallelize_module(module, tp_mesh, plan)
        if fsdp:
            fully_shard(module, mesh=mesh["dp_shard"])
        return [getattr(module, f"l{i}").weight for i in range(len(fulls))]
    return place


def probes(ctx: Ctx) -> list[tuple[Probe, int]]:
    """(probe, ranks it needs; 4 means an even number, at least 4: a 2-D mesh (2, W/2)). Shapes are small; every
    probe gets fresh parameters per attempt."""
    fs, W = ctx.fs, ctx.world
    owned = lambda axis: fs.ComputeLayout(shardings_by_mesh_axis={axis: fs.Owned()})  # noqa: E731
    block = lambda axis, rows: fs.ComputeLayout(  # noqa: E731
        shardings_by_mesh_axis={axis: fs.BlockShard(dim=0, block_size=rows)})
    per_expert = lambda *axes: fs.ComputeLayout(  # noqa: E731
        shardings_by_mesh_axis={a: Shard(0) for a in axes})
    fsdp1 = _fsdp(ctx, (W,), ("dp_shard",))
    ep_mesh = ((W // 2, 2), ("efsdp", "ep")) if W >= 4 and W % 2 == 0 else ((W,), ("ep",))
    out = [
        (Probe("fsdp_even", "FSDP2 Shard(0), even shards", f"fully_shard, 1-D dp_shard mesh of {W}",
               [Param("layers.0.w1.weight", (4 * W, 12), whole, layout=owned("dp_shard")),
                Param("layers.0.w2.weight", (2 * W, 4 * W), whole, layout=owned("dp_shard"))],
               fsdp1, "Owned() on dp_shard"), 1),
        (Probe("fsdp_uneven", "FSDP2 uneven shards", f"fully_shard, 1-D dp_shard mesh of {W}",
               [Param("layers.0.w1.weight", (3 * W + 1, 10), whole, layout=owned("dp_shard")),
                Param("layers.0.w2.weight", (2 * W + 1, 6), whole, layout=owned("dp_shard"))],
               fsdp1, "Owned() on dp_shard"), 2),
        (Probe("fsdp_empty", "FSDP2 with an empty shard", f"fully_shard, 1-D dp_shard mesh of {W}: dim 0 = W−1",
               [Param("layers.0.w1.weight", (W - 1, 8), whole, layout=owned("dp_shard"))],
               fsdp1, "Owned() on dp_shard"), 2),
        (Probe("hsdp", "HSDP (replicate × shard)", f"fully_shard, (dp_replicate 2, dp_shard {W // 2}) mesh",
               [Param("layers.0.w1.weight", (12, 10), whole, layout=owned("dp_shard")),
                Param("layers.0.w2.weight", (7, 12), whole, layout=owned("dp_shard"))],
               _fsdp(ctx, (2, W // 2), ("dp_replicate", "dp_shard")), "Owned() on dp_shard"), 4),
        (Probe("tp_colwise", "TP ColwiseParallel (Shard(0))", f"parallelize_module, 1-D tp mesh of {W}",
               [Param("layers.0.w1.weight", (4 * W, 10), whole, layout=owned("tp"))],
               _tp(ctx, ["colwise"], fsdp=False), "Owned() on tp"), 2),
        (Probe("tp_rowwise", "TP RowwiseParallel (Shard(1))", f"parallelize_module, 1-D tp mesh of {W}",
               [Param("layers.0.w2.weight", (10, 4 * W), whole, layout=owned("tp"))],
               _tp(ctx, ["rowwise"], fsdp=False), "Owned() on tp"), 2),
        (Probe("fsdp_tp_colwise", "FSDP + TP colwise (_StridedShard)",
               f"ColwiseParallel on tp, fully_shard on dp_shard, (dp_shard 2, tp {W // 2}) mesh",
               [Param("layers.0.w1.weight", (16, 10), whole, layout=fs.ComputeLayout(
                   shardings_by_mesh_axis={"dp_shard": fs.Owned(), "tp": fs.Owned()}))],
               _tp(ctx, ["colwise"], fsdp=True), "Owned() on dp_shard and tp (one owner of their product)",
               alternatives=[("Owned() on dp_shard only", [owned("dp_shard")]),
                             ("Owned() on tp only", [owned("tp")])]), 4),
        (Probe("fsdp_tp_rowwise", "FSDP + TP rowwise (Shard(0) × Shard(1))",
               f"RowwiseParallel on tp, fully_shard on dp_shard, (dp_shard 2, tp {W // 2}) mesh",
               [Param("layers.0.w2.weight", (10, 16), whole, layout=fs.ComputeLayout(
                   shardings_by_mesh_axis={"dp_shard": fs.Owned(), "tp": fs.Owned()}))],
               _tp(ctx, ["rowwise"], fsdp=True), "Owned() on dp_shard and tp (one owner of their product)",
               alternatives=[("Owned() on dp_shard only", [owned("dp_shard")]),
                             ("Owned() on tp only", [owned("tp")])]), 4),
        (Probe("experts_shard0", "3D experts [E, M, N], Shard(0) (EP)",
               f"DTensor on a ({', '.join(f'{n} {s}' for n, s in zip(ep_mesh[1], ep_mesh[0]))}) mesh, "
               "Shard(0) on every axis",
               [Param("layers.1.moe.experts.w1", (2 * W, 6, 8), experts, layout=per_expert(*ep_mesh[1])),
                Param("layers.1.moe.experts.w2", (2 * W, 8, 6), experts, layout=per_expert(*ep_mesh[1]))],
               _distribute(ctx, ep_mesh[0], ep_mesh[1], [Shard(0)] * len(ep_mesh[0])),
               "Shard(0) on every expert axis (kimi's per_expert)"), 2),
        (Probe("experts_shard1", "3D experts [E, M, N], Shard(1) (E < ranks)",
               f"DTensor, 1-D dp_shard mesh of {W}, Shard(1)",
               [Param("layers.1.moe.experts.w1", (2, 4 * W, 8), experts, layout=per_expert("dp_shard"))],
               _distribute(ctx, (W,), ("dp_shard",), [Shard(1)]),
               "Shard(0) on dp_shard (kimi's per_expert)",
               alternatives=[("Owned() on dp_shard", [owned("dp_shard")])]), 2),
        (Probe("fused_qkv_equal", "fused QKV, equal blocks (MHA: q, k, v of 8 rows)",
               f"fully_shard, 1-D dp_shard mesh of {W}; blocks straddle shard boundaries",
               [Param("layers.0.attention.wqkv.weight", (24, 16), row_blocks(8, 8, 8),
                      ours={"split_sizes": (8, 8, 8)}, layout=block("dp_shard", 8))],
               fsdp1, "BlockShard(dim=0, block_size=8) on dp_shard"), 2),
        (Probe("fused_qkv_gqa", "fused QKV, unequal blocks (GQA: q 8, k 4, v 4 rows)",
               f"fully_shard, 1-D dp_shard mesh of {W}; shard boundaries on 4-row boundaries",
               [Param("layers.0.attention.wqkv.weight", (16, 16), row_blocks(8, 4, 4),
                      ours={"split_sizes": (8, 4, 4)}, layout=block("dp_shard", 4))],
               fsdp1, "BlockShard(dim=0, block_size=4): it takes one block size",
               note="BlockShard takes one block size, so no ComputeLayout expresses q 8 + k 4 + v 4 rows; "
                    "block_size=4 (the largest size dividing every block) makes 4 matrices of 4 rows, q cut in "
                    "two: a different update, and its error against the q/k/v rule measures that difference."), 2),
        (Probe("per_head", "per-head blocks (3 heads of 4 rows)", f"fully_shard, 1-D dp_shard mesh of {W}",
               [Param("layers.0.attention.wq.weight", (12, 8), row_blocks(4, 4, 4), ours={"num_heads": 3},
                      layout=block("dp_shard", 4))],
               fsdp1, "BlockShard(dim=0, block_size=4) on dp_shard (kimi's per_query_head)"), 2),
        (Probe("two_groups", "two param groups (lr 0.02 and 0.005)", f"fully_shard, 1-D dp_shard mesh of {W}",
               [Param("layers.0.w1.weight", (4 * W, 12), whole, layout=owned("dp_shard"), group=0),
                Param("layers.0.w2.weight", (4 * W, 8), whole, layout=owned("dp_shard"), group=1)],
               fsdp1, "two groups, Owned() on dp_shard", groups=[{"lr": LR}, {"lr": 0.005}]), 1),
        (Probe("muon_adamw", "Muon + AdamW in one optimizer (a matrix and a norm weight)",
               f"fully_shard, 1-D dp_shard mesh of {W}",
               [Param("layers.0.w1.weight", (4 * W, 12), whole, layout=owned("dp_shard")),
                Param("layers.0.norm.weight", (4 * W,), None, ours={"algorithm": "adamw"},
                      layout=owned("dp_shard"))],
               fsdp1, "one group, Owned() on dp_shard for both (it has no AdamW path)"), 1),
        (Probe("polar_express", "non-quintic schedule (polar_express)", f"fully_shard, 1-D dp_shard mesh of {W}",
               [Param("layers.0.w1.weight", (4 * W, 12), whole, layout=owned("dp_shard"))],
               fsdp1, "ns_coefficients = the 5 polar_express triples, eps 1e-6", method="polar_express",
               builtin_kwargs={"ns_coefficients": [tuple(c) for c in POLAR_EXPRESS], "eps": 1e-6}), 1),
        (Probe("fp32_ns", "fp32 Newton–Schulz", f"fully_shard, 1-D dp_shard mesh of {W}",
               [Param("layers.0.w1.weight", (4 * W, 12), whole, layout=owned("dp_shard"))],
               fsdp1, "ns_dtype=torch.float32 (our argument's name)", builtin_kwargs={"ns_dtype": torch.float32},
               note="the built-in has no NS dtype argument; _zeropower_via_newtonschulz casts to bfloat16"), 1),
        (Probe("plain", "plain (non-DTensor) tensors, replicated (DDP style)", f"nn.Parameter on each of {W} ranks",
               [Param("layers.0.w1.weight", (12, 10), whole, layout=owned("dp_shard")),
                Param("layers.1.moe.experts.w1", (3, 4, 6), experts, layout=per_expert("dp_shard"))],
               lambda fulls: [nn.Parameter(t.clone().to(ctx.device)) for t in fulls],
               "Owned() / Shard(0) on dp_shard", process_group=True), 1),
        (Probe("cpu", "CPU device (gloo)", f"fully_shard on CPU, 1-D dp_shard mesh of {W}",
               [Param("layers.0.w1.weight", (4 * W, 12), whole, layout=owned("dp_shard"))],
               _fsdp(ctx, (W,), ("dp_shard",), device="cpu"), "Owned() on dp_shard", device="cpu"), 1),
    ]
    return out


# --------------------------------------------------------------------------- one probe


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", torch.float64)


def _grad_like(g_full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    if isinstance(p, DTensor):
        return distribute_tensor(g_full.to(p.device), p.device_mesh, p.placements)
    return g_full.to(p.device).clone()


def _reference(probe: Probe, fulls, grads) -> list[torch.Tensor]:
    """Each parameter's update in fp64 by the rule (docs/update_rule.md), on full tensors."""
    deltas = []
    for spec, p, g in zip(probe.params, fulls, grads):
        hp = {"lr": LR, **probe.groups[spec.group]}
        if spec.matrices is None:  # AdamW: torch's own, in fp64
            q = nn.Parameter(p.double().clone())
            q.grad = g.double()
            torch.optim.AdamW([q], lr=ADAMW_LR, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=WEIGHT_DECAY).step()
            deltas.append(q.detach() - p.double())
            continue
        new, _ = muon_step64(p, g, torch.zeros_like(p, dtype=torch.float64), lr=hp["lr"], momentum=MOMENTUM,
                             nesterov=True, weight_decay=WEIGHT_DECAY, method=probe.method, adjust_lr="original",
                             matrices=spec.matrices)
        deltas.append(new - p.double())
    return deltas


def _step_and_compare(probe: Probe, opt, params, fulls, grads, ref) -> tuple[float, dict]:
    for p, g in zip(params, grads):
        p.grad = _grad_like(g, p)
    opt.step()
    errors = {}
    for spec, p, before, r in zip(probe.params, params, fulls, ref):
        d = _full(p) - before.double()
        errors[spec.fqn] = float((d - r).norm() / r.norm().clamp_min(1e-30))
    return max(errors.values()), errors


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _build_ours(probe: Probe, params, ns_dtype=torch.float32):
    groups = []
    for spec, p in zip(probe.params, params):
        options = {"lr": LR, **probe.groups[spec.group], "algorithm": "muon", **spec.ours}
        if options["algorithm"] == "adamw":
            options.update(lr=ADAMW_LR, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=WEIGHT_DECAY)
        groups.append({"params": [p], "param_names": [spec.fqn], **options})
    return dm.DistMuon(groups, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY,
                       ns_method=probe.method, ns_steps=NS_STEPS, ns_dtype=ns_dtype, adjust_lr="original",
                       process_group=dist.group.WORLD if probe.process_group else None)


def _build_builtin(ctx: Ctx, probe: Probe, params, layouts=None):
    groups = [{"params": [], "param_names": [], **g} for g in probe.groups]
    for spec, p in zip(probe.params, params):
        groups[spec.group]["params"].append(p)
        groups[spec.group]["param_names"].append(spec.fqn)
    kwargs = dict(lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY, ns_steps=NS_STEPS,
                  adjust_lr_fn=None)  # None is its sqrt(max(1, m/n)), ours "original"
    kwargs.update(probe.builtin_kwargs)
    layouts = layouts or [spec.layout for spec in probe.params]
    return ctx.fs.build_dist_muon(
        groups, compute_sharding_by_fqn={spec.fqn: layout for spec, layout in zip(probe.params, layouts)},
        bucket_configs=(ctx.fs.BucketConfig(patterns=("*",), name="all"),), **kwargs)


class _DeviceCheckBypassed:
    """Replace ONLY the built-in's device check: accept one local device of any type, as it accepts one CUDA
    device. Its other storage check (DTensor parameters) still runs, by calling the original first."""

    def __init__(self, builtin_module):
        self.cls = builtin_module.DistMuon
        self.original = self.cls._validate_parameter_storage

    def __enter__(self):
        original = self.original

        def validate_parameter_storage(opt):
            try:
                return original(opt)
            except ValueError as e:
                if DEVICE_CHECK not in str(e):
                    raise
            devices = {p.to_local().device for g in opt.param_groups for p in g["params"]}
            if len(devices) != 1:
                raise ValueError(f"device check bypassed, but the parameters are on {len(devices)} devices")
            return devices.pop()

        self.cls._validate_parameter_storage = validate_parameter_storage
        return self

    def __exit__(self, *exc):
        self.cls._validate_parameter_storage = self.original


def _in_runtime(e: BaseException) -> bool:
    """Did the built-in raise while creating its stream/event runtime (after all layout validation)?"""
    return any("_optimizer_reshard_runtime" in frame.filename for frame in traceback.extract_tb(e.__traceback__))


def _agree(outcome: dict) -> dict:
    """Every rank's outcome; one if all agree (validation is deterministic), else all of them."""
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, {k: v for k, v in outcome.items() if k != "per_param"})
    if all(o == outcomes[0] for o in outcomes):
        return outcome
    return {"status": "ranks disagree", "message": "ranks disagree", "per_rank": outcomes}


def run_probe(ctx: Ctx, probe: Probe, builtin_module) -> dict:
    device = torch.device(probe.device) if probe.device else ctx.device
    # Weights at a model's scale (std 0.02): with weights ~1 the fp32 rounding of p itself, not the update rule,
    # would be ~1e-5 of an lr-0.005 update.
    fulls = [_seeded(s.shape, 1000 + i, std=0.02) for i, s in enumerate(probe.params)]
    grads = [_seeded(s.shape, 2000 + i) for i, s in enumerate(probe.params)]
    ref = _reference(probe, fulls, grads)
    row = {"key": probe.key, "feature": probe.feature, "layout": probe.layout, "world_size": ctx.world,
           "device": device.type, "builtin_config": probe.builtin_config, "note": probe.note,
           "params": {s.fqn: list(s.shape) for s in probe.params}}

    # ours
    try:
        params = probe.place(fulls)
        opt = _build_ours(probe, params)
        err, per = _step_and_compare(probe, opt, params, fulls, grads, ref)
        ours = {"status": "exact" if err <= EXACT else "differs", "max_rel_error": err, "per_param": per}
    except Exception as e:  # noqa: BLE001 - a refusal is a result
        ours = {"status": "refused", "message": _describe(e)}
    row["ours"] = _agree(ours)
    dist.barrier()

    # the built-in as shipped; then, where its device check stopped it, with only that check bypassed, so its
    # layout validation runs; then the other layouts worth trying
    shipped, step = _try_builtin(ctx, probe, None, fulls, grads, ref, builtin_module, bypass=False)
    row["builtin"] = shipped
    stopped_by_device = shipped["status"] == "refused" and DEVICE_CHECK in shipped["message"]
    bypassed = None
    if stopped_by_device:
        bypassed, step = _try_builtin(ctx, probe, None, fulls, grads, ref, builtin_module, bypass=True)
    row["builtin_device_check_bypassed"] = bypassed
    if step is None:
        step = {"status": "n/a", "message": "n/a (not constructed)"}
    elif bypassed is not None and step["status"] == "ran":
        step = {**step, "status": "ran, device check bypassed"}
    if step["status"].startswith("ran"):
        # the built-in's NS is always bf16: ours in bf16 on the same row tells its rounding from a different rule
        try:
            params = probe.place(fulls)
            err, _ = _step_and_compare(probe, _build_ours(probe, params, torch.bfloat16), params, fulls, grads, ref)
            step = {**step, "ours_bf16_max_rel_error": err}
        except Exception as e:  # noqa: BLE001
            step = {**step, "ours_bf16": f"failed: {_describe(e)}"}
        step = _agree(step)
        dist.barrier()
    row["builtin_step"] = step
    row["builtin_alternatives"] = []
    for description, layouts in probe.alternatives:
        outcome, _ = _try_builtin(ctx, probe, layouts, fulls, grads, ref, builtin_module, bypass=stopped_by_device,
                                  run_step=False)
        row["builtin_alternatives"].append({"config": description, **outcome})
    return row


def _try_builtin(ctx, probe, layouts, fulls, grads, ref, builtin_module, *, bypass: bool, run_step: bool = True):
    """(construction outcome, step outcome or None when not constructed), the same on every rank."""
    step = None
    try:
        with _DeviceCheckBypassed(builtin_module) if bypass else contextlib.nullcontext():
            params = probe.place(fulls)
            opt = _build_builtin(ctx, probe, params, layouts)
        outcome = {"status": "constructed", "message": "layout accepted; construction completed"}
    except Exception as e:  # noqa: BLE001 - a refusal is a result
        if bypass and _in_runtime(e):
            # everything but the runtime ran: layouts resolved, bucket plans built and compared across ranks
            outcome = {"status": "accepted", "message": "layout accepted (layouts resolved, bucket plan built and "
                                                        "checked across ranks); then creating its CUDA streams failed "
                                                        f"on {probe.device or ctx.device.type}: {_describe(e)}"}
            step = {"status": "skipped", "message": "skipped (CUDA only: its streams)"}
        else:
            outcome = {"status": "refused", "message": _describe(e)}
    outcome = _agree(outcome)
    dist.barrier()
    if outcome["status"] == "constructed" and run_step:
        try:
            err, per = _step_and_compare(probe, opt, params, fulls, grads, ref)
            step = {"status": "ran", "max_rel_error": err, "per_param": per}
        except Exception as e:  # noqa: BLE001
            step = {"status": "failed", "message": _describe(e)}
        step = _agree(step)
        dist.barrier()
    return outcome, step


# --------------------------------------------------------------------------- step benchmark (CUDA)


def step_benchmark(ctx: Ctx, args) -> list[dict]:
    from . import gpu

    fs, W = ctx.fs, ctx.world
    mesh = ctx.mesh((W,), ("dp_shard",))

    def place(params):
        return [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in params]

    class Synced:  # with W > 1 the step's time is the slowest rank's
        def __init__(self, opt):
            self.opt = opt

        def step(self):
            self.opt.step()
            if W > 1:
                dist.barrier()

    rows = []
    for stack in args.stack:
        shapes = gpu.STACKS[stack]
        per_layer = len(shapes) // 4  # STACKS repeat one layer's matrices 4 times
        names = [f"layers.{i // per_layer}.m{i % per_layer}" for i in range(len(shapes))]

        def ours(ps):
            return Synced(dm.DistMuon([{"params": ps, "param_names": names, "algorithm": "muon"}], lr=LR,
                                      momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, ns_method="quintic",
                                      ns_steps=NS_STEPS, ns_dtype=torch.bfloat16, adjust_lr="original"))

        def builtin(ps):
            layouts = {n: fs.ComputeLayout(shardings_by_mesh_axis={
                "dp_shard": fs.Owned() if len(s) == 2 else Shard(0)}) for n, s in zip(names, shapes)}
            buckets = [fs.BucketConfig(patterns=(f"layers.{layer}.*",), name=f"layers.{layer}")
                       for layer in range(4)]  # one per layer, as kimi's config buckets layers
            return Synced(fs.build_dist_muon([{"params": ps, "param_names": names}], compute_sharding_by_fqn=layouts,
                                             bucket_configs=buckets, lr=LR, momentum=MOMENTUM,
                                             weight_decay=WEIGHT_DECAY, ns_steps=NS_STEPS, adjust_lr_fn=None))

        result = {"stack": stack, "world_size": W}
        for name, make in (("dist_muon", ours), ("builtin", builtin)):
            try:
                result[name] = gpu._measure(make, shapes, False, args.steps, place=place)
            except Exception as e:  # noqa: BLE001 - a failure is a result
                result[name] = {"status": f"failed: {_describe(e)}"}
            torch.cuda.empty_cache()
        if "step_ms" in result["dist_muon"] and "step_ms" in result["builtin"]:
            result["builtin_over_ours_time"] = result["builtin"]["step_ms"] / result["dist_muon"]["step_ms"]
            result["builtin_over_ours_transient"] = (result["builtin"]["transient_bytes"]
                                                     / max(1, result["dist_muon"]["transient_bytes"]))
        transient = [None] * W
        dist.all_gather_object(transient, {k: result[k].get("transient_bytes") for k in ("dist_muon", "builtin")})
        result["transient_bytes_per_rank"] = transient
        rows.append(result)
    return rows


# --------------------------------------------------------------------------- output


def _cell(outcome: Optional[dict]) -> str:
    if outcome is None:
        return "n/a (stopped before the device check)"
    s, msg = outcome["status"], outcome.get("message", "")
    if s in ("exact", "differs"):
        return f"{s} (max rel. error {outcome['max_rel_error']:.1e})"
    if s.startswith("ran"):
        ours_bf16 = outcome.get("ours_bf16_max_rel_error")
        return f"{s} (max rel. error {outcome['max_rel_error']:.1e}" + (
            "" if ours_bf16 is None else f"; ours with bf16 NS: {ours_bf16:.1e}") + ")"
    if s in ("refused", "failed"):
        return f"{s}: {msg}"
    return msg or s


def _bypassed_cell(row: dict) -> str:
    cell = _cell(row["builtin_device_check_bypassed"]) if row["builtin"]["status"] == "refused" else "n/a"
    for alt in row.get("builtin_alternatives", ()):
        cell += f"<br>also tried {alt['config']}: {_cell(alt)}"
    return cell


def format_table(out: dict) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [f"W = {out['world_size']}, device {out['device']}, torchtitan {out['torchtitan']}",
             "", "| feature | layout | ours (dist_muon, fp32 NS) | built-in given | built-in as shipped | "
             "built-in, device check bypassed (construction) | built-in step |", "|---|---|---|---|---|---|---|"]
    notes = []
    for row in out["probes"]:
        if "skipped" in row:
            lines.append(f"| {row['feature']} | | {row['skipped']} | | | | |")
            continue
        feature = row["feature"]
        if row.get("note"):
            notes.append(row["note"])
            feature += f" [{len(notes)}]"
        lines.append("| " + " | ".join(esc(x) for x in (
            feature, row["layout"], _cell(row["ours"]), row["builtin_config"], _cell(row["builtin"]),
            _bypassed_cell(row), _cell(row["builtin_step"]))) + " |")
    lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)] + [""]
    bench = out["step_benchmark"]
    if isinstance(bench, str):
        lines.append(f"step benchmark: {bench}")
    else:
        lines += ["| stack | W | ours ms/step | built-in ms/step | built-in / ours | ours transient MiB | "
                  "built-in transient MiB |", "|---|---|---|---|---|---|---|"]
        for r in bench:
            o, b = r["dist_muon"], r["builtin"]
            f = lambda d, k, s=1.0: f"{d[k] / s:.2f}" if k in d else d.get("status", "")  # noqa: E731
            lines.append(f"| {r['stack']} | {r['world_size']} | {f(o, 'step_ms')} | {f(b, 'step_ms')} | "
                         f"{r.get('builtin_over_ours_time', float('nan')):.2f} | {f(o, 'transient_bytes', 2**20)} | "
                         f"{f(b, 'transient_bytes', 2**20)} |")
    return "\n".join(lines)


def main(argv=None) -> Optional[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here (rank 0)")
    ap.add_argument("--tt030-env", help="torchtitan 0.3.0 --target directory (default: $DIST_MUON_TT030_ENV, "
                                        "else launch.torchtitan030_env.ensure_env())")
    ap.add_argument("--probes", help="comma-separated probe keys (default: all)")
    ap.add_argument("--no-bench", action="store_true", help="feature probes only")
    ap.add_argument("--stack", nargs="+", default=["llama", "moe"], help="benchmarks.gpu stacks to time")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (median reported)")
    ap.add_argument("--collective-timeout", type=float, default=120,
                    help="seconds; a rank that diverges fails instead of hanging")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun, e.g. torchrun --nproc_per_node 2 -m benchmarks.builtin_distmuon")
    torch.set_num_threads(1)  # the ranks share the cores
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # CPU tensors need gloo even on a GPU run (the CPU-device probe)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=args.collective_timeout))
    try:
        return _run(args, cuda)
    finally:
        dist.destroy_process_group()


def _run(args, cuda: bool) -> Optional[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    # Rank 0 locates (perhaps builds) the 0.3.0 environment once; the others use its answer.
    where = [torchtitan030_path(args.tt030_env) if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)
    fs, builtin_module = import_flex_shard(where[0])
    import torchtitan

    ctx = Ctx(world, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"), fs)
    wanted = set(args.probes.split(",")) if args.probes else None
    rows = []
    for probe, needs in probes(ctx):
        if wanted is not None and probe.key not in wanted:
            continue
        if world < needs or (needs >= 4 and world % 2):
            rows.append({"key": probe.key, "feature": probe.feature,
                         "skipped": f"skipped: needs an even number of ranks >= {needs} (torchrun --nproc_per_node "
                                    f"{needs})" if needs >= 4 else f"skipped: needs {needs} ranks"})
            continue
        rows.append(run_probe(ctx, probe, builtin_module))
        if rank == 0:
            print(f"[{probe.key}] ours: {_cell(rows[-1]['ours'])} | built-in: {_cell(rows[-1]['builtin'])}",
                  flush=True)
    if args.no_bench:
        bench = "not run (--no-bench)"
    elif not cuda:
        cpu_row = next((r for r in rows if r.get("key") == "cpu" and "builtin" in r), None)
        measured = cpu_row["builtin"].get("message") if cpu_row else "not probed (--probes without cpu)"
        bench = f"skipped: built-in DistMuon is CUDA only ({measured})"
    else:
        bench = step_benchmark(ctx, args)
    if rank != 0:
        return None
    from .run import machine

    out = {"world_size": world, "device": ctx.device.type, "torchtitan": torchtitan.__version__,
           "torchtitan_path": os.path.dirname(torchtitan.__file__),
           "settings": dict(lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY,
                            ns="quintic (3.4445, -4.7750, 2.0315) unless the row says otherwise, 5 steps",
                            ours_ns_dtype="float32 in the probes, bfloat16 in the step benchmark",
                            builtin_ns_dtype="bfloat16 (always)", adjust_lr="sqrt(max(1, m/n))",
                            adamw=dict(lr=ADAMW_LR, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=WEIGHT_DECAY),
                            exact=f"max rel. update error <= {EXACT:g} vs the fp64 reference"),
           "device_check_bypass": (
               "built-in probes that stop at 'DistMuon requires one CUDA device per process' are constructed a "
               "second time with ONLY DistMuon._validate_parameter_storage patched to accept one local non-CUDA "
               "device (its DTensor check still runs); nothing else is changed, and its step is not run there"),
           "probes": rows, "step_benchmark": bench, "machine": machine(),
           "command": f"torchrun --nproc_per_node {world} -m benchmarks.builtin_distmuon " + " ".join(sys.argv[1:])}
    table = format_table(out)
    print(table, flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
