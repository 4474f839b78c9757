"""Sharding invariance: a distributed step equals the single-process step on full tensors."""

import pytest
import torch

import layouts

FP32 = {"ns_dtype": torch.float32}


def _kitchen_sink_errors(world, common, kwargs):
    entries = layouts.kitchen_sink(world)
    opt, ref, reference = layouts.run_both(entries, common=common, **kwargs)
    return layouts.relative_errors(entries, opt, ref, reference)


def _worst(results):
    worst = {}
    for errors in results:
        for k, v in errors.items():
            worst[k] = max(worst.get(k, 0.0), v)
    return worst


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("nesterov", [True, False])
def test_every_layout_in_one_optimizer_fp32(world, nesterov, pool2, pool4):
    pool = pool2 if world == 2 else pool4
    kwargs = dict(lr=0.05, weight_decay=0.1, adamw_lr=0.01, bucket_bytes=4096, steps=3)
    worst = _worst(pool.run(_kitchen_sink_errors, world, {**FP32, "nesterov": nesterov}, kwargs))
    bad = {k: v for k, v in worst.items() if v > 1e-5}
    assert not bad, f"layouts differing from the single-process step: {bad}"
    assert any(k.startswith("tp.") for k in worst) and any(k.startswith("ep.") for k in worst)


def test_every_layout_bf16_defaults(pool4):
    kwargs = dict(lr=0.05, weight_decay=0.1, steps=3)
    worst = _worst(pool4.run(_kitchen_sink_errors, 4, {}, kwargs))
    bad = {k: v for k, v in worst.items() if v > 2e-2}
    assert not bad, bad


def test_round_robin_owners_and_quintic(pool4):
    kwargs = dict(lr=0.05, owner_policy="round_robin", steps=2)
    worst = _worst(pool4.run(_kitchen_sink_errors, 4, {**FP32, "ns_method": "quintic", "adjust_lr": "match_rms_adamw"}, kwargs))
    assert max(worst.values()) <= 1e-5, worst


def _ddp_errors(world):
    import torch.distributed as dist

    entries = layouts.ddp_entries(world)
    opt, ref, reference = layouts.run_both(entries, common=FP32, lr=0.05, weight_decay=0.1, process_group=dist.group.WORLD)
    owned = opt.last_step_stats.matrices_owned
    return layouts.relative_errors(entries, opt, ref, reference), owned, len(opt.plan.matrices)


def test_ddp_style_replicated_params_split_the_work(pool4):
    results = pool4.run(_ddp_errors, 4)
    worst = _worst([r[0] for r in results])
    assert max(worst.values()) <= 1e-5, worst
    owned = [r[1] for r in results]
    assert sum(owned) == results[0][2], "every matrix orthogonalized exactly once across replicas"
    assert max(owned) < results[0][2], "replicas split the work instead of repeating it"
