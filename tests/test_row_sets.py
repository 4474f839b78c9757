"""Row-set views: an interleaved fused weight (torchtitan 0.3.0's llama3 ``wqkv``, rows laid out as
``(n_kv, heads_per_kv + 2, head_dim)``) is three matrices Q, K, V, each made of one row block per
KV group. Every step is compared with an fp64 reference that de-interleaves Q, K and V explicitly,
orthogonalizes each whole and scales it by its own shape, on one process, under FSDP (shard
boundaries cutting through blocks) and under TP (ColwiseParallel).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dist_muon as dm
import layouts
from reference import ns64, scale

LR, WD, MU, BETA2, EPS = 0.05, 0.1, 0.95, 0.9, 1e-8
METHOD = "polar_express"
TOL = 1e-5  # fp32 Newton–Schulz against fp64


@dataclass(frozen=True)
class Geometry:
    """A fused interleaved wqkv: per KV group, ``heads_per_kv`` Q heads, then one K and one V head."""

    n_kv: int
    heads_per_kv: int
    head_dim: int
    dim: int

    @property
    def rows(self) -> int:
        return self.n_kv * (self.heads_per_kv + 2) * self.head_dim

    @property
    def options(self) -> dict:
        hd = self.head_dim
        return {"split_sizes": (self.heads_per_kv * hd, hd, hd), "interleave": self.n_kv}


# Shard boundaries: 40 rows at W=2 cut between KV groups; 27 rows (9 per group) cut at 14, inside K.
WHOLE_GROUPS = Geometry(n_kv=2, heads_per_kv=3, head_dim=4, dim=16)
MID_BLOCK = Geometry(n_kv=3, heads_per_kv=1, head_dim=3, dim=8)


def deinterleave(t: torch.Tensor, geo: Geometry) -> list[torch.Tensor]:
    """Q, K, V of a fused ``[rows, cols]`` tensor as separate matrices (Q in head order)."""
    cols = t.shape[-1]
    groups = t.reshape(geo.n_kv, geo.heads_per_kv + 2, geo.head_dim, cols)
    hpk = geo.heads_per_kv
    return [groups[:, :hpk].reshape(-1, cols), groups[:, hpk].reshape(-1, cols), groups[:, hpk + 1].reshape(-1, cols)]


def reinterleave(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geo: Geometry) -> torch.Tensor:
    cols = q.shape[-1]
    per_group = (geo.n_kv, -1, geo.head_dim, cols)
    return torch.cat([q.reshape(per_group), k.reshape(per_group), v.reshape(per_group)], dim=1).reshape(-1, cols)


def _momentum64(g, buf):
    buf = buf.lerp(g, 1 - MU)
    return g.lerp(buf, MU), buf


def muon_reference(p, g, buf, geo: Geometry):
    """One Muon step in fp64 on separate Q, K, V: (parameter, momentum) after it."""
    u, buf = _momentum64(g, buf)
    orthogonal = [scale(*U.shape, "original") * ns64(U, METHOD) for U in deinterleave(u, geo)]
    return p * (1 - LR * WD) - LR * reinterleave(*orthogonal, geo), buf


def normuon_reference(p, g, buf, second_moment, geo: Geometry):
    """One NorMuon step in fp64 on separate Q, K, V: (parameter, momentum, second moment) after it."""
    u, buf = _momentum64(g, buf)
    updates, moments = [], []
    for U, v in zip(deinterleave(u, geo), deinterleave(second_moment, geo)):
        O = ns64(U, METHOD)
        v = v.lerp((O * O).mean(dim=-1, keepdim=True), 1 - BETA2)
        normed = O / (v.sqrt() + EPS)
        updates.append(scale(*U.shape, "original") * normed * O.norm() / normed.norm())
        moments.append(v)
    return p * (1 - LR * WD) - LR * reinterleave(*updates, geo), buf, reinterleave(*moments, geo)


# --------------------------------------------------------------------------- layouts (run in workers)


def _plain(full: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(full.clone())


def _fsdp(full: torch.Tensor) -> nn.Parameter:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    module = nn.Module()
    module.wqkv = nn.Parameter(full.clone())
    fully_shard(module, mesh=init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    return module.wqkv


def _tp(full: torch.Tensor) -> nn.Parameter:
    """ColwiseParallel on a Linear whose weight is the fused wqkv: Shard(0), whole KV groups per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    linear = nn.Linear(full.shape[1], full.shape[0], bias=False)
    linear.weight.data.copy_(full)
    parallelize_module(linear, init_device_mesh("cpu", (torch.distributed.get_world_size(),)), ColwiseParallel())
    return linear.weight


LAYOUTS = {"plain": _plain, "fsdp": _fsdp, "tp": _tp}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def interleaved_errors(layout: str, geo: Geometry, algorithm: str = "muon", steps: int = 3) -> dict[str, float]:
    """Step the fused wqkv (laid out by ``layout``) and the fp64 reference from the same parameters;
    the worst relative error of each step's update, and of the final optimizer state."""
    full = layouts.seeded((geo.rows, geo.dim), 7)
    param = LAYOUTS[layout](full)
    opt = dm.DistMuon([{"params": [param], "param_names": ["wqkv"], "algorithm": algorithm, **geo.options}],
                      lr=LR, weight_decay=WD, momentum=MU, ns_method=METHOD, ns_dtype=torch.float32,
                      normuon_beta2=BETA2, normuon_eps=EPS)
    buf = torch.zeros(full.shape, dtype=torch.float64)
    second_moment = torch.zeros(geo.rows, 1, dtype=torch.float64)
    errors = {"update": 0.0}
    for step in range(steps):
        g = layouts.seeded(full.shape, 100 + step)
        before = layouts.full_of(param.detach()).double()
        param.grad = layouts._shard_like(g, param)
        opt.step()
        if algorithm == "normuon":
            want, buf, second_moment = normuon_reference(before, g.double(), buf, second_moment, geo)
        else:
            want, buf = muon_reference(before, g.double(), buf, geo)
        got = layouts.full_of(param.detach()).double()
        errors["update"] = max(errors["update"], _rel(got - before, want - before))
    state = opt.state[param]
    errors["momentum_buffer"] = _rel(layouts.full_of(state["momentum_buffer"]), buf)
    if algorithm == "normuon":
        errors["second_moment"] = _rel(layouts.full_of(state["second_moment"]), second_moment)
    return errors


def _worst(per_rank: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(errors[k] for errors in per_rank) for k in per_rank[0]}


# --------------------------------------------------------------------------- the view itself


def test_wqkv_is_three_matrices_each_with_its_own_shape_and_scale():
    geo = WHOLE_GROUPS  # n_heads = 6, head_dim 4: Q 24×16, K and V 8×16
    view = dm.build_view((geo.rows, geo.dim), **geo.options)
    assert view.matrix_shapes == ((24, 16), (8, 16), (8, 16))
    q_rows = [block[0] for block in view.row_sets[0].blocks]
    assert q_rows == [(0, 12), (20, 32)]  # kv0's three Q heads, then kv1's
    assert view.row_sets[0].row_offsets == (0, 12)
    rows = {r["fqn"]: r for r in dm.routing.routing_rows([{"params": [torch.zeros(geo.rows, geo.dim)],
                                                            "param_names": ["wqkv"], **geo.options}])}
    assert rows["wqkv"]["matrices"] == "1×24×16 + 2×8×16"
    assert rows["wqkv"]["lr_scale"] == "1/1.2247"  # K, V 8×16 → 1; Q 24×16 → sqrt(1.5)


def test_interleave_one_and_experts():
    plain = dm.build_view((20, 16), split_sizes=(12, 4, 4))
    assert dm.build_view((20, 16), split_sizes=(12, 4, 4), interleave=1) == plain
    fused = dm.build_view((2 * 8, 4), num_experts=2, split_sizes=(2, 1, 1), interleave=2)
    stacked = dm.build_view((2, 8, 4), split_sizes=(2, 1, 1), interleave=2)
    assert fused.describe() == stacked.describe() == "2×4×4 + 4×2×4"
    assert [b[0] for b in fused.row_sets[4].blocks] == [(10, 11), (14, 15)]  # expert 1 (Q, K, V): K at 8 + (2, 6)
    assert [b[1] for b in stacked.row_sets[4].blocks] == [(2, 3), (6, 7)]


@pytest.mark.parametrize("options, match", [
    ({"interleave": 2}, r"wqkv: interleave=2 needs split_sizes"),
    ({"interleave": 2, "num_heads": 4}, r"wqkv: interleave goes with split_sizes, not num_heads"),
    ({"interleave": 0, "split_sizes": (40,)}, r"wqkv: interleave must be a positive integer, got 0"),
    ({"interleave": 2.0, "split_sizes": (20,)}, r"wqkv: interleave must be a positive integer"),
    ({"interleave": 3, "split_sizes": (12, 4, 4)},
     r"wqkv: split_sizes \(12, 4, 4\) sum to 20, × interleave=3 to 60, but dim 0 has size 40; fix them so "
     r"sum\(split_sizes\) \* interleave adds up"),
])
def test_bad_interleave_is_refused_naming_the_parameter(options, match):
    W = nn.Parameter(torch.zeros(40, 16))
    with pytest.raises(ValueError, match=match):
        dm.DistMuon([{"params": [W], "param_names": ["wqkv"], "algorithm": "muon", **options}], lr=0.02)


# --------------------------------------------------------------------------- the update, every layout


@pytest.mark.parametrize("algorithm", ["muon", "normuon"])
@pytest.mark.parametrize("geo", [WHOLE_GROUPS, MID_BLOCK], ids=["whole_groups", "mid_block"])
def test_interleaved_wqkv_equals_the_deinterleaved_fp64_reference_on_one_process(geo, algorithm):
    errors = interleaved_errors("plain", geo, algorithm)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("algorithm", ["muon", "normuon"])
@pytest.mark.parametrize("geo", [WHOLE_GROUPS, MID_BLOCK], ids=["cut_between_groups", "cut_mid_block"])
def test_interleaved_wqkv_under_fsdp_equals_the_fp64_reference(pool2, geo, algorithm):
    errors = _worst(pool2.run(interleaved_errors, "fsdp", geo, algorithm))
    assert max(errors.values()) <= TOL, errors


def test_interleaved_wqkv_under_colwise_tp_equals_the_fp64_reference(pool2):
    errors = _worst(pool2.run(interleaved_errors, "tp", WHOLE_GROUPS))
    assert max(errors.values()) <= TOL, errors


def _pieces_cut_mid_block():
    """At W=2 the 27-row MID_BLOCK weight is cut at row 14, inside kv1's K block (rows 12..15)."""
    full = layouts.seeded((MID_BLOCK.rows, MID_BLOCK.dim), 7)
    opt = dm.DistMuon([{"params": [_fsdp(full)], "algorithm": "muon", **MID_BLOCK.options}], lr=LR)
    k = opt.plan.matrices[1]
    return [(ps.holders, [b.box[0] for b in ps.blocks]) for ps in k.pieces]


def test_a_shard_boundary_inside_a_block_splits_it_between_holders(pool2):
    pieces = pool2.run(_pieces_cut_mid_block)[0]
    # K = kv0's rows 3..6, kv1's 12..15, kv2's 21..24, stacked: rank 0 holds rows 0..5 of K, rank 1 rows 5..9.
    assert pieces == [((0,), [(0, 3), (3, 5)]), ((1,), [(5, 6), (6, 9)])]


def test_contiguous_matrices_keep_their_pieces():
    """One block per matrix: the pieces are the block's intersection with the layout, as before row sets."""
    from benchmarks.plan_scale import RankGrid
    from torch.distributed.tensor import Shard

    from dist_muon import plan as plan_mod
    from dist_muon.layout import dtensor_layout

    key = dm.numerics.NSKey(torch.float32, dm.numerics.resolve_schedule(METHOD, 5))
    cases = [((20, 16), {"split_sizes": (12, 4, 4)}), ((3, 10, 6), {}), ((27, 8), {"num_heads": 3})]
    for shape, options in cases:
        layout = dtensor_layout(shape, RankGrid(4), [Shard(len(shape) - 2)], range(4))
        spec = plan_mod.MatrixSpec("w", dm.build_view(shape, **options), layout, key, "original", 0)
        for m in plan_mod.build_plan([spec], 4, bucket_bytes=1 << 20).matrices:
            (block,) = m.row_set.blocks
            assert m.pieces == plan_mod._piece_sets(layout, block), (shape, options)


# --------------------------------------------------------------------------- Muown, agreement, checkpoints


def test_muown_on_an_interleaved_wqkv_equals_separate_q_k_v():
    """Muown's row norms are per row of the parameter, whichever matrix the row belongs to."""
    geo = WHOLE_GROUPS
    full = layouts.seeded((geo.rows, geo.dim), 3)
    fused = nn.Parameter(full.clone())
    separate = [nn.Parameter(t.clone()) for t in deinterleave(full, geo)]
    kwargs = dict(lr=LR, weight_decay=WD, ns_dtype=torch.float32)
    opt_fused = dm.DistMuon([{"params": [fused], "algorithm": "muown", **geo.options}], **kwargs)
    opt_separate = dm.DistMuon([{"params": separate, "algorithm": "muown"}], **kwargs)
    for step in range(3):
        g = layouts.seeded(full.shape, 50 + step)
        fused.grad = g.clone()
        for p, gi in zip(separate, deinterleave(g, geo)):
            p.grad = gi.clone()
        opt_fused.step()
        opt_separate.step()
    want = reinterleave(*[p.detach() for p in separate], geo)
    assert _rel(fused.detach() - full, want - full) <= TOL
    for key in ("magnitude", "momentum_buffer"):
        assert _rel(opt_fused.state[fused][key], reinterleave(*[opt_separate.state[p][key] for p in separate], geo)) <= TOL


def _disagreeing_interleave():
    rank = torch.distributed.get_rank()
    W = _fsdp(layouts.seeded((16, 8), 1))
    options = {"split_sizes": (2, 1, 1), "interleave": 4} if rank == 0 else {"split_sizes": (8, 4, 4)}
    dm.DistMuon([{"params": [W], "param_names": ["wqkv"], "algorithm": "muon", **options}], lr=0.02)


def test_ranks_that_disagree_on_interleave_raise_on_every_rank(pool2):
    from harness import RankFailure

    with pytest.raises(RankFailure) as info:
        pool2.run(_disagreeing_interleave)
    assert len(info.value.failures) == 2
    assert all("RankDisagreement" in msg and "wqkv" in msg for msg in info.value.failures.values())


def test_a_state_dict_with_another_interleave_is_refused():
    def optimizer(interleave):
        W = nn.Parameter(torch.zeros(16, 8))
        group = {"params": [W], "param_names": ["wqkv"], "algorithm": "muon", "split_sizes": (16,)}
        return dm.DistMuon([{**group, "interleave": interleave}], lr=0.02)

    saved = optimizer(1).state_dict()
    with pytest.raises(ValueError, match=r"wqkv: interleave=1 in the state dict but None"):
        optimizer(None).load_state_dict(saved)


def _wqkv_training(interleave):
    """A model with a 16-row wqkv seen as Q, K, V: contiguous (8, 4, 4) or interleaved (4, 2, 2) × 2."""
    model = nn.Module()
    model.wqkv = nn.Parameter(layouts.seeded((16, 8), 5))
    split = (8, 4, 4) if interleave is None else (4, 2, 2)
    rule = {"split_sizes": split} if interleave is None else {"split_sizes": split, "interleave": interleave}
    opt = dm.DistMuon(dm.build_param_groups(model, rules=[(r"wqkv", rule)]), lr=0.02, ns_dtype=torch.float32)
    model.wqkv.grad = torch.ones_like(model.wqkv)
    opt.step()
    return model, opt


def test_a_checkpoint_written_with_interleave_is_refused_without_it(tmp_path):
    """Our group has no interleave key (it is kept only when set): the checkpoint's is compared with None."""
    from dist_muon import checkpoint as ck

    ck.save_checkpoint(str(tmp_path), 1, *_wqkv_training(2))
    with pytest.raises(ck.CheckpointError, match=r"wqkv: view option interleave=2 in the checkpoint but None now"):
        ck.load_checkpoint(ck.latest_checkpoint(str(tmp_path)), *_wqkv_training(None))


def test_groups_without_interleave_do_not_carry_the_key():
    """Checkpoints written before ``interleave`` existed lack it, and DCP refuses keys a checkpoint lacks."""
    _, opt = _wqkv_training(None)
    assert "interleave" not in opt.param_groups[0] and "interleave" not in opt.state_dict()["param_groups"][0]
    _, opt = _wqkv_training(2)
    assert opt.param_groups[0]["interleave"] == 2
