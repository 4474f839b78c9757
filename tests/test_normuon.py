"""NorMuon groups: the rule against an fp64 re-implementation, sharding invariance on every layout
(per-row state included), and DCP resume at another world size."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import dist_muon as dm
import layouts
from dist_muon.numerics import orthogonalize

LR, WD, MU, BETA2, EPS = 0.05, 0.1, 0.95, 0.9, 1e-8


def _matrix_indices(shape, options):
    """Index tuples selecting each matrix of a parameter (as dist_muon.views cuts it)."""
    if len(shape) == 3:
        return [(e,) for e in range(shape[0])]
    if "split_sizes" in options:
        out, row = [], 0
        for size in options["split_sizes"]:
            out.append((slice(row, row + size),))
            row += size
        return out
    if "num_heads" in options:
        size = shape[0] // options["num_heads"]
        return [(slice(h * size, (h + 1) * size),) for h in range(options["num_heads"])]
    return [(slice(None),)]


def normuon_fp64(W, g, buf, v, options):
    """One NorMuon step in fp64, straight from the rule in docs/update_rule.md."""
    buf.lerp_(g, 1 - MU)
    u = g.lerp(buf, MU)
    W.mul_(1 - LR * WD)
    for idx in _matrix_indices(W.shape, options):
        O = orthogonalize(u[idx], dtype=torch.float64)
        m, n = O.shape
        v[idx] = v[idx].lerp((O * O).mean(dim=-1, keepdim=True), 1 - BETA2)
        normed = O / (v[idx].sqrt() + EPS)
        normed = normed * O.norm() / normed.norm()
        W[idx] -= LR * max(1.0, m / n) ** 0.5 * normed


CASES = {
    "plain": ((12, 16), {}),
    "tall": ((14, 5), {}),
    "experts": ((4, 6, 8), {}),
    "qkv": ((20, 16), {"split_sizes": (12, 4, 4)}),
    "heads": ((12, 8), {"num_heads": 3}),
}


def test_normuon_equals_an_fp64_reimplementation():
    torch.manual_seed(0)
    params = {k: nn.Parameter(torch.randn(*shape)) for k, (shape, _) in CASES.items()}
    groups = [{"params": [params[k]], "param_names": [k], "algorithm": "normuon", **opts}
              for k, (_, opts) in CASES.items()]
    opt = dm.DistMuon(groups, lr=LR, weight_decay=WD, momentum=MU, ns_dtype=torch.float32,
                      normuon_beta2=BETA2, normuon_eps=EPS, bucket_bytes=2048)
    assert len(opt.plan.buckets) > 1
    ref = {k: p.detach().double().clone() for k, p in params.items()}
    bufs = {k: torch.zeros_like(r) for k, r in ref.items()}
    vs = {k: torch.zeros(*opt.state[p]["second_moment"].shape, dtype=torch.float64) for k, p in params.items()}
    for step in range(3):
        grads = {k: torch.randn_like(p) for k, p in params.items()}
        before = {k: p.detach().double().clone() for k, p in params.items()}
        for k, p in params.items():
            p.grad = grads[k].clone()
        opt.step()
        for k, (_, opts) in CASES.items():
            normuon_fp64(ref[k], grads[k].double(), bufs[k], vs[k], opts)
        for k, p in params.items():
            got, want = p.detach().double() - before[k], ref[k] - before[k]
            assert float((got - want).norm() / want.norm()) <= 1e-4, (k, step)
            ref[k].copy_(p.detach().double())  # each step from the same parameters
            assert float((opt.state[p]["second_moment"].double() - vs[k]).norm() / vs[k].norm()) <= 1e-4, k
            assert opt.state[p]["second_moment"].dtype == torch.float32


def test_normuon_is_routable_by_default_and_validated():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    groups = dm.build_param_groups(model, matrix_algorithm="normuon")
    assert {g["algorithm"] for g in groups} == {"normuon", "adamw"}
    with pytest.raises(ValueError, match="beta2"):
        dm.DistMuon(groups, lr=0.02, normuon_beta2=1.5)
    with pytest.raises(ValueError, match="matrix_algorithm"):
        dm.build_param_groups(model, matrix_algorithm="adamw")


def _normuon_kitchen_sink(world):
    entries = layouts.kitchen_sink(world)
    for e in entries:  # every Muon matrix of every layout becomes NorMuon
        if e.full.ndim >= 2 and e.options.get("algorithm", "muon") == "muon":
            e.options = {**e.options, "algorithm": "normuon"}
    updates = []
    opt, ref, reference = layouts.run_both(entries, common={"ns_dtype": torch.float32}, updates=updates, lr=0.05,
                                           weight_decay=0.1, bucket_bytes=4096, steps=3)
    errors = layouts.update_errors(entries, opt, ref, reference, updates)
    assert any(k.endswith(":second_moment") for k in errors)
    return errors


def test_normuon_on_every_layout_equals_the_single_process_step(pool4):
    worst = {}
    for errors in pool4.run(_normuon_kitchen_sink, 4):
        for k, v in errors.items():
            worst[k] = max(worst.get(k, 0.0), v)
    bad = {k: v for k, v in worst.items() if v > 1e-5}
    assert not bad, bad
    assert any(k.startswith("tp.") and k.endswith(":second_moment") for k in worst)  # dim −1 (rowwise) included


# --------------------------------------------------------------------------- DCP resume at another world size


def _model():
    torch.manual_seed(7)
    model = nn.Module()
    model.up = nn.Linear(8, 12, bias=False)
    model.down = nn.Linear(12, 8, bias=False)
    model.experts = nn.Parameter(torch.randn(4, 6, 8))
    return model


def _shard(model, world):
    if world == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def _train(model, opt, start, stop):
    from torch.distributed.tensor import DTensor, distribute_tensor

    for step in range(start, stop):
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        opt.step()


def _segment(world, start, stop, load_from=None, save_to=None):
    """Build at ``world`` (FSDP, or plain at 1), optionally load, train, optionally save; full state back."""
    from torch.distributed.tensor import DTensor

    from dist_muon import checkpoint as ck

    model = _shard(_model(), world)
    opt = dm.DistMuon(dm.build_param_groups(model, matrix_algorithm="normuon"), lr=0.05, weight_decay=0.1,
                      ns_dtype=torch.float32, bucket_bytes=1024)
    if load_from:
        ck.load_checkpoint(load_from, model, opt)
    _train(model, opt, start, stop)
    if save_to:
        ck.save_checkpoint(save_to, stop, model, opt)
    full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
    out = {f"param:{n}": full(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out.update({f"{n}:{k}": full(v) for k, v in opt.state[p].items()})
    return out


def test_normuon_resumes_through_dcp_at_another_world_size(pool2, tmp_path):
    root = str(tmp_path / "ckpt")
    pool2.run(_segment, 2, 0, 3, None, root)
    from dist_muon import checkpoint as ck

    resumed = _segment(1, 3, 5, ck.latest_checkpoint(root))  # FSDP 2 → 1 process
    uninterrupted = _segment(1, 0, 5)
    for k, want in uninterrupted.items():
        err = float((resumed[k].double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
        assert err <= 1e-5, (k, err)
