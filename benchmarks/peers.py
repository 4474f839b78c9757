"""Optimizers compared against DistMuon: our naive baseline and every peer from PyPI that runs here.

Every builder gets the FSDP2-sharded parameters (DTensor, Shard(0) on a 1-D mesh) and the common
settings, and returns either an optimizer (anything with ``step()``) or raises ``Unavailable``
with the reason it cannot run on this setup (recorded in the JSON, never dropped silently).

Common settings (everyone): lr, momentum 0.95, Nesterov, weight decay 0, Keller's quintic
Newton–Schulz, 5 steps, update scale sqrt(max(1, m/n)) — torch.optim.Muon's rule. NS runs in
``Settings.ns_dtype``: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are ~10x slower; the
PyPI peers pick their own NS dtype).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

NS_STEPS = 5
MOMENTUM = 0.95


class Unavailable(RuntimeError):
    """This implementation cannot run on this setup; the message says why."""


@dataclass
class Settings:
    lr: float
    world: int
    device: str  # "cpu" or "cuda"
    bucket_bytes: int
    eager_peers: bool = False  # run peers' @torch.compile'd NS loops eagerly (fast smoke runs)
    ns_dtype: torch.dtype = torch.bfloat16


def _eager(fn):
    return getattr(fn, "_torchdynamo_orig_callable", fn)


# --------------------------------------------------------------------------- naive baseline


class NaiveMuon(torch.optim.Optimizer):
    """The baseline DistMuon replaces: all-gather every matrix, Newton–Schulz on EVERY rank, keep your shard.

    Same rule and same numerics (dist_muon's NS kernel, quintic, same dtype) as DistMuon, so the difference
    in time is only the distribution strategy. Momentum lives on the local shard.
    """

    def __init__(self, params, *, lr: float, momentum: float = MOMENTUM, ns_steps: int = NS_STEPS,
                 ns_dtype=torch.bfloat16):
        super().__init__(list(params), dict(lr=lr, momentum=momentum))
        from dist_muon.numerics import resolve_schedule

        self.schedule = resolve_schedule("quintic", ns_steps)
        self.ns_dtype = ns_dtype
        self.peak_full_bytes = 0

    @torch.no_grad()
    def step(self, closure=None):
        from dist_muon.numerics.newton_schulz import orthogonalize_with

        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf, grad = state["momentum_buffer"].to_local(), p.grad.to_local()
                buf.lerp_(grad, 1 - mu)
                u_local = grad.lerp(buf, mu).to(self.ns_dtype)
                u = DTensor.from_local(u_local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                full = u.full_tensor()  # all-gather: every rank now holds the whole matrix
                self.peak_full_bytes = max(self.peak_full_bytes, full.numel() * full.element_size())
                O = orthogonalize_with(full, self.schedule, self.ns_dtype)  # W-fold redundant compute
                m, n = p.shape
                scale = max(1.0, m / n) ** 0.5
                rows = p.to_local().shape[0]
                start = _shard_start(p)
                p.to_local().add_(O[start:start + rows].to(p.dtype), alpha=-lr * scale)
        return None


def _shard_start(p: DTensor) -> int:
    """First global row of this rank's Shard(0) piece (torch.chunk rule, as FSDP2)."""
    rank = p.device_mesh.get_local_rank()
    chunk = -(-p.shape[0] // p.device_mesh.size())
    return min(rank * chunk, p.shape[0])


# --------------------------------------------------------------------------- builders


def build_dist_muon(params, names, s: Settings):
    import dist_muon as dm

    group = {"params": params, "param_names": names, "algorithm": "muon"}
    return dm.DistMuon([group], lr=s.lr, momentum=MOMENTUM, nesterov=True, weight_decay=0.0, ns_method="quintic",
                       ns_steps=NS_STEPS, ns_dtype=s.ns_dtype, adjust_lr="original", bucket_bytes=s.bucket_bytes)


def build_naive(params, names, s: Settings):
    return NaiveMuon(params, lr=s.lr, ns_dtype=s.ns_dtype)


def build_adamw(params, names, s: Settings):
    # foreach=False: the foreach path on DTensors goes through slow per-op dispatch; the floor should be fast.
    return _LocalAdamW(params, lr=s.lr)


class _LocalAdamW:
    """torch.optim.AdamW on the local shards (the usual FSDP2 setup; AdamW is elementwise)."""

    def __init__(self, params, lr):
        self.params = params
        self.local = [torch.nn.Parameter(p.to_local(), requires_grad=False) for p in params]
        self.opt = torch.optim.AdamW(self.local, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def step(self):
        for p, q in zip(self.params, self.local):
            q.grad = p.grad.to_local()
        self.opt.step()


def build_muon_fsdp2(params, names, s: Settings):
    try:
        import muon_fsdp2
    except ImportError as e:
        raise Unavailable(f"muon-fsdp2 is not installed ({e}); pip install -c constraints.txt muon-fsdp2")
    for p in params:
        if p.shape[0] % s.world:
            raise Unavailable("muon-fsdp2 concatenates equal gather buffers: every dim 0 must divide the world size")
    if s.eager_peers:
        muon_fsdp2.nsloop_torch = _eager(muon_fsdp2.nsloop_torch)
    # rms_scale=False gives torch.optim.Muon's sqrt(max(1, m/n)); NS is its own quintic (bf16, eps 1e-7,
    # torch.compile'd), identical coefficients to ours. Owner = parameter index % world (round robin).
    return muon_fsdp2.Muon([dict(params=params, lr=s.lr, momentum=MOMENTUM, weight_decay=0.0, use_muon=True,
                                 rms_scale=False, nesterov=True, ns_steps=NS_STEPS)])


def build_dtensor_muon(params, names, s: Settings, *, foreach: bool = False):
    try:
        import dtensor_muon
        from dtensor_muon.optim import optim as dm_optim
        from dtensor_muon.orthogonalize import orthogonalize as dm_ortho
    except ImportError as e:
        raise Unavailable(f"dtensor-muon is not installed ({e}); pip install -c constraints.txt dtensor-muon")
    if s.device != "cuda":
        if foreach:
            raise Unavailable(
                "dtensor_muon.MuonForeach hard-codes torch.device('cuda') and moves every batch there "
                "(optim_foreach.py: `cuda = torch.device(\"cuda\")`); it cannot run on CPU/gloo"
            )
        # As shipped, Muon.muon calls zeropower(..., use_triton=True), whose Gram kernel asserts CUDA
        # tensors (kernels/gram.py). Its own pure-torch loop (use_triton=False) is the CPU path we run.
        if not getattr(dm_optim, "_bench_patched", False):
            dm_optim.zeropower = functools.partial(dm_ortho.zeropower, use_triton=False)
            dm_optim._bench_patched = True
    if s.eager_peers:
        dm_ortho.ns_loop, dm_ortho.pe_loop = _eager(dm_ortho.ns_loop), _eager(dm_ortho.pe_loop)
    cls = dtensor_muon.MuonForeach if foreach else dtensor_muon.Muon
    # "newton_schulz" = Keller's quintic (eps 1e-7), same as ours; wd=0 so cautious WD is moot.
    return cls(params, lr=s.lr, wd=0.0, use_cautious_wd=False, momentum=MOMENTUM, nesterov=True, ns_steps=NS_STEPS,
               orthogonalization_strategy="newton_schulz")


def build_torchtitan_muon(params, names, s: Settings):
    # It lives in torchtitan 0.3.0 (torchtitan.distributed.flex_shard), which cannot share this interpreter with
    # the 0.2.2 that the rest of the harness uses; it needs per-FQN ComputeLayouts and one CUDA device per process.
    raise Unavailable("torchtitan 0.3.0's built-in DistMuon is CUDA only and needs its own environment: "
                      "`torchrun -m benchmarks.builtin_distmuon` probes and times it (docs/benchmarks.md)")


# name -> (builder, note). Order is the order of the JSON and the tables.
DISTRIBUTED = {
    "dist_muon": (build_dist_muon, "this project; quintic NS, balanced owners, bucketed all-to-all"),
    "naive": (build_naive, "all-gather every matrix, NS on every rank, keep the shard (dist_muon NS kernel)"),
    "muon_fsdp2": (build_muon_fsdp2, "PyPI muon-fsdp2: gather to owner = index % W, NS (torch.compile), scatter"),
    "dtensor_muon": (build_dtensor_muon, "PyPI dtensor-muon Muon: full_tensor() on every rank, NS, redistribute "
                                         "(its non-Triton NS loop on CPU)"),
    "dtensor_muon_foreach": (functools.partial(build_dtensor_muon, foreach=True),
                             "PyPI dtensor-muon MuonForeach: stack by shape, Shard(0) the stack, NS, redistribute"),
    "torchtitan_muon": (build_torchtitan_muon, "torchtitan 0.3.0 DistMuon: benchmarks/builtin_distmuon.py"),
    "adamw": (build_adamw, "torch.optim.AdamW on local shards: the floor"),
}


def barrier():
    if dist.is_initialized():
        dist.barrier()
