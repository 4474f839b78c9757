"""The distributed engine's own guarantees: whole matrices only, each once; balance; memory; agreement."""

import pytest
import torch
from torch.distributed.tensor import Shard

import dist_muon as dm
import layouts
from dist_muon import plan as plan_mod
from dist_muon.layout import dtensor_layout
from benchmarks.plan_scale import RankGrid
from harness import RankFailure


def _record_numerics_inputs():
    """One step on every layout, then the single-process reference; returns what reached the
    Newton–Schulz entry point on this rank, and how many of those (the last ones) were the reference's."""
    from dist_muon.optimizer import pipeline

    seen = []
    original = pipeline.newton_schulz_

    def recording(X, *args, **kwargs):
        assert not isinstance(X, torch.distributed.tensor.DTensor), "NS must never run on a DTensor"
        seen.extend(x.clone() for x in X)
        return original(X, *args, **kwargs)

    pipeline.newton_schulz_ = recording
    try:
        _, ref, _ = layouts.run_both(layouts.kitchen_sink(4), steps=1, common={"ns_dtype": torch.float32}, lr=0.05,
                                     bucket_bytes=2048)
    finally:
        pipeline.newton_schulz_ = original
    return seen, len(ref.plan.matrices)


def test_every_matrix_is_orthogonalized_whole_and_exactly_once(pool4):
    per_rank = pool4.run(_record_numerics_inputs)
    n_reference = per_rank[0][1]
    reference = per_rank[0][0][-n_reference:]  # whole matrices of the single-process step, from full tensors
    distributed = [x for seen, n in per_rank for x in seen[:-n]]
    assert len(distributed) == len(reference)
    unmatched = list(range(len(reference)))
    for x in distributed:
        hit = next((i for i in unmatched if reference[i].shape == x.shape and torch.allclose(reference[i], x)), None)
        assert hit is not None, f"a {tuple(x.shape)} input that is not one whole matrix of the model"
        unmatched.remove(hit)
    assert not unmatched


def llama_specs(world, layers=32, d=4096, kv=1024, ffn=14336):
    mesh = RankGrid(world)
    shapes = [("wq", (d, d)), ("wk", (kv, d)), ("wv", (kv, d)), ("wo", (d, d)), ("w1", (ffn, d)), ("w3", (ffn, d)),
              ("w2", (d, ffn))]
    key = dm.numerics.NSKey(torch.bfloat16, dm.numerics.resolve_schedule("polar_express", 5))
    return [
        plan_mod.MatrixSpec(f"layers.{i}.{n}", dm.build_view(s), dtensor_layout(s, mesh, [Shard(0)], range(world)),
                            key, "original", 0)
        for i in range(layers) for n, s in shapes
    ]


def test_llama_plan_is_balanced_at_w4():
    plan = plan_mod.build_plan(llama_specs(4), 4, bucket_bytes=1 << 30)
    assert plan.imbalance() <= 1.1, plan.describe()
    for bucket, per_rank in zip(plan.buckets, plan.work_bytes_per_bucket()):
        for rank, work in enumerate(per_rank):  # two buckets in flight stay within the budget
            owned = [mi for mi in bucket if plan.matrices[mi].owner == rank]
            assert work <= plan.bucket_bytes // 2 or len(owned) == 1


def test_round_robin_is_available_and_less_balanced_on_mixed_shapes():
    rr = plan_mod.build_plan(llama_specs(4, layers=4), 4, bucket_bytes=1 << 30, owner_policy="round_robin")
    balanced = plan_mod.build_plan(llama_specs(4, layers=4), 4, bucket_bytes=1 << 30)
    assert balanced.imbalance() <= rr.imbalance()


def _disagreeing_optimizer(kind):
    import torch.distributed as dist

    rank = dist.get_rank()
    entries = layouts.fsdp_entries(4)
    groups = layouts.groups_for(entries, [e.param for e in entries], {})
    lr = 0.02
    if kind == "lr" and rank == 2:
        lr = 0.03
    if kind == "view" and rank == 1:
        groups[3]["split_sizes"] = (10, 5, 5)
    if kind == "params" and rank == 3:
        groups = groups[:-1]
    dm.DistMuon(groups, lr=lr)
    return "built"


@pytest.mark.parametrize("kind, match", [("lr", "lr"), ("view", "fsdp.qkv"), ("params", "disagree")])
def test_ranks_with_different_configurations_raise_not_hang(pool4, kind, match):
    with pytest.raises(RankFailure) as info:
        pool4.run(_disagreeing_optimizer, kind)
    assert len(info.value.failures) == 4, "every rank must raise"
    assert all("RankDisagreement" in msg and match in msg for msg in info.value.failures.values())


def _changed_after_construction(kind):
    """Two steps; between them, one rank changes a setting the plan depends on."""
    import torch.distributed as dist

    entries = layouts.fsdp_entries(4)
    params = [e.param for e in entries]
    opt = dm.DistMuon(layouts.groups_for(entries, params, {}), lr=0.02, ns_dtype=torch.float32)

    def step(seed):
        for i, (e, p) in enumerate(zip(entries, params)):
            p.grad = layouts._shard_like(layouts.seeded(e.full.shape, seed + i), p)
        opt.step()

    step(1)
    if dist.get_rank() == 1:
        if kind == "ns_steps":
            opt.param_groups[0]["ns_steps"] = 3
        elif kind == "split_sizes":
            opt.param_groups[3]["split_sizes"] = (10, 5, 5)
        elif kind == "add_param_group":
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "param_names": ["extra.weight"],
                                "algorithm": "muon"})
        elif kind == "bucket_bytes":
            opt.bucket_bytes = 4096
        elif kind == "owner_policy":
            opt.owner_policy = "round_robin"
    step(100)
    return "stepped"


@pytest.mark.parametrize("kind", ["ns_steps", "split_sizes", "add_param_group", "bucket_bytes", "owner_policy"])
def test_a_setting_changed_on_one_rank_after_construction_raises_on_every_rank(pool4, kind):
    with pytest.raises(RankFailure) as info:
        pool4.run(_changed_after_construction, kind)
    assert len(info.value.failures) == 4, "every rank must raise, none may hang"
    assert all("RankDisagreement" in msg for msg in info.value.failures.values()), info.value


def test_updates_follow_a_parameter_whose_storage_is_replaced():
    """Frozen views into outputs must not write into a parameter's old storage after ``p.data = ...``."""
    W = torch.nn.Parameter(torch.randn(6, 8, 4))
    opt = dm.DistMuon([{"params": [W], "algorithm": "muon"}], lr=0.1, bucket_bytes=800, ns_dtype=torch.float32)
    assert len(opt.plan.buckets) > 1  # each expert's update is a view into W, not W itself
    W.grad = torch.randn_like(W)
    opt.step()
    W.data = W.data.clone()
    before = W.detach().clone()
    W.grad = torch.randn_like(W)
    opt.step()
    assert all(not torch.equal(W[e], before[e]) for e in range(W.shape[0]))
