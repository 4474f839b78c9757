"""bf16 parameters end to end: Muon, Muown and AdamW groups in one DistMuon.

bf16 parameters are compared through their updates (p_after - p_before). Rounding the parameter
to bf16 costs up to one bf16 spacing (ulp) per element, which is a few percent of one update, so
bounds are written as "one ulp of the parameter per element, plus a small fraction of the update";
the parameters are initialised small (std 0.02-0.1, like real inits) so that ulp stays well below
the update and a wrong update cannot hide inside the rounding.
"""

from __future__ import annotations

import copy
import os
import zlib

import pytest
import torch
from torch import nn

import dist_muon as dm
import layouts

BF16 = torch.bfloat16
# name: (shape, algorithm, init std). Uneven shards at world 2: tall (7 rows each), experts (2 + 1).
SPECS = {
    "w": ((12, 16), "muon", 0.02),
    "tall": ((14, 6), "muon", 0.02),
    "experts": ((3, 6, 8), "muon", 0.02),
    "muown": ((10, 12), "muown", 0.1),
    "muown_experts": ((2, 5, 6), "muown", 0.1),
    "bias": ((16,), "adamw", 0.02),
    "embed": ((20, 8), "adamw", 0.02),
}
# fp32 Newton–Schulz so that the only bf16 in play is the parameters' (and their state's) own.
HYPER = dict(lr=0.05, weight_decay=0.1, adamw_lr=0.01, ns_dtype=torch.float32)
# State dtypes for bf16 parameters: Muon momentum and AdamW moments follow the parameter;
# Muown's magnitudes, direction norms and their Adam moments are fp32 statistics.
STATE_DTYPES = {
    "muon": {"momentum_buffer": BF16},
    "muown": {"momentum_buffer": BF16, "step": torch.float32, "magnitude": torch.float32,
              "direction_norm": torch.float32, "magnitude_exp_avg": torch.float32,
              "magnitude_exp_avg_sq": torch.float32},
    "adamw": {"step": torch.float32, "exp_avg": BF16, "exp_avg_sq": BF16},
}
# bf16 state (momentum, Adam moments) and bf16 arithmetic inside torch's AdamW move an update by
# about one bf16 relative rounding (2^-8) or two; measured 0.4-1.7e-2 against an fp32 optimizer,
# of which the parameter's own rounding (the ulp term) is most. 2^-7 on top of the ulp term fits
# that; an update 5% off in scale already fails it for every parameter.
STATE_ROUNDING = 2.0**-7


def make_module(dtype=BF16, seed: int = 0) -> nn.Module:
    module = nn.Module()
    for i, (name, (shape, _, std)) in enumerate(SPECS.items()):
        module.register_parameter(name, nn.Parameter((layouts.seeded(shape, seed + i) * std).to(dtype)))
    return module


def groups_of(module: nn.Module) -> list[dict]:
    return [{"params": [p], "param_names": [n], "algorithm": SPECS[n][1]} for n, p in module.named_parameters()]


def grad_for(name: str, shape, step: int) -> torch.Tensor:
    return layouts.seeded(shape, zlib.crc32(name.encode()) + 7919 * step)


def ulp(p: torch.Tensor) -> torch.Tensor:
    """bf16 spacing at each element of p, in fp64."""
    a = p.detach().abs().to(BF16)
    return torch.nextafter(a, torch.full_like(a, float("inf"))).double() - a.double()


def check_state_dtypes(opt, module) -> None:
    for name, p in module.named_parameters():
        got = {k: v.dtype for k, v in opt.state[p].items()}
        assert got == STATE_DTYPES[SPECS[name][1]], (name, got)


def bf16_update_error(delta: torch.Tensor, delta_ref: torch.Tensor, p_after: torch.Tensor) -> tuple[float, float]:
    """(‖Δ − Δ_ref‖, allowed): one ulp of the new parameter per element plus STATE_ROUNDING·‖Δ_ref‖."""
    err = float((delta - delta_ref).norm())
    return err, float(ulp(p_after).norm()) + STATE_ROUNDING * float(delta_ref.norm())


def _set_grads(module, step, dtype=None) -> None:
    for name, p in module.named_parameters():
        p.grad = grad_for(name, p.shape, step).to(dtype or p.dtype)


def _fp32_shadow(module, opt):
    """An fp32 copy of the bf16 parameters with the bf16 optimizer's state: the fp32-math step."""
    shadow = make_module(torch.float32)
    with torch.no_grad():
        for p, q in zip(module.parameters(), shadow.parameters()):
            q.copy_(p.float())
    shadow_opt = dm.DistMuon(groups_of(shadow), **HYPER)
    shadow_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # bf16 → fp32 is exact
    return shadow, shadow_opt


def _compare_with_fp32_math(module, opt, steps: int, grad_dtype=BF16) -> tuple[dict, dict]:
    """Every step: our update vs an fp32 optimizer's update from the same parameters and state,
    with the same gradient values (bf16 ones, or genuinely fp32 ones when ``grad_dtype`` is fp32).

    Returns ({(step, name): (err, allowed)}, {(step, name, key): error of the state's change}).
    """
    updates, states = {}, {}
    for step in range(steps):
        shadow, shadow_opt = _fp32_shadow(module, opt)
        before = {n: p.detach().double().clone() for n, p in module.named_parameters()}
        state_before = {(n, k): v.double().clone()
                        for n, p in module.named_parameters() for k, v in opt.state[p].items()}
        for (name, p), q in zip(module.named_parameters(), shadow.parameters()):
            g = grad_for(name, p.shape, step).to(grad_dtype)
            p.grad, q.grad = g, g.float()
        opt.step()
        shadow_opt.step()
        for (name, p), q in zip(module.named_parameters(), shadow.parameters()):
            assert p.dtype == BF16
            delta, delta_ref = p.detach().double() - before[name], q.detach().double() - before[name]
            assert delta.any(), f"{name} did not move at step {step}"
            updates[(step, name)] = bf16_update_error(delta, delta_ref, p)
            for key, value in opt.state[p].items():
                ours, theirs = value.double(), shadow_opt.state[q][key].double()
                if key == "step":
                    assert ours == theirs, (name, step)
                    continue
                change = theirs - state_before[(name, key)]
                states[(step, name, key)] = float((ours - theirs).norm() / change.norm())
    return updates, states


# How far each state tensor's change in one step may be from the fp32 optimizer's, relative to that
# change (measured worst in brackets). bf16 state is rounded to bf16 (2^-9 relative) after fp32-ish
# arithmetic [7e-3]. Muown's magnitude and its Adam moments are fp32 arithmetic on identical inputs
# [1.4e-5]. Muown's direction norm changes by a second-order amount (‖v - lr·s·O‖ - ‖v‖), so the
# update's bf16-momentum error (~1%) shows doubled there [2.4e-2].
STATE_CHANGE_TOL = {
    "momentum_buffer": 2.0**-6, "exp_avg": 2.0**-6, "exp_avg_sq": 2.0**-6,
    "magnitude": 1e-4, "magnitude_exp_avg": 1e-4, "magnitude_exp_avg_sq": 1e-4, "direction_norm": 5e-2,
}


def _assert_close_to_fp32_math(updates: dict, states: dict) -> None:
    bad = {k: v for k, v in updates.items() if v[0] > v[1]}
    assert not bad, f"bf16 updates off the fp32-math step by more than bf16 rounding (error, allowed): {bad}"
    bad = {k: v for k, v in states.items() if v > STATE_CHANGE_TOL[k[2]]}
    assert not bad, f"optimizer state off the fp32-math step (relative to its change): {bad}"


# ----------------------------------------------------------------------------- one process


def test_bf16_params_state_dtypes_and_fp32_math_reference():
    module = make_module()
    opt = dm.DistMuon(groups_of(module), **HYPER)
    check_state_dtypes(opt, module)  # eager state
    _assert_close_to_fp32_math(*_compare_with_fp32_math(module, opt, steps=4))
    check_state_dtypes(opt, module)


def test_bf16_state_dict_round_trip_is_bitwise_and_resumes_bitwise():
    module = make_module()
    opt = dm.DistMuon(groups_of(module), **HYPER)
    for step in range(2):
        _set_grads(module, step)
        opt.step()
    resumed = make_module(seed=99)  # different values: everything must come from the copy below
    with torch.no_grad():
        for p, q in zip(module.parameters(), resumed.parameters()):
            q.copy_(p)
    resumed_opt = dm.DistMuon(groups_of(resumed), **{**HYPER, "lr": 0.3})
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    check_state_dtypes(resumed_opt, resumed)
    _assert_same_state(opt, module, resumed_opt, resumed)
    for step in range(2, 5):
        _set_grads(module, step), _set_grads(resumed, step)
        opt.step(), resumed_opt.step()
    for (name, p), q in zip(module.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name}: resumed training differs from uninterrupted training"
    _assert_same_state(opt, module, resumed_opt, resumed)


def _assert_same_state(opt_a, module_a, opt_b, module_b) -> None:
    for (name, p), q in zip(module_a.named_parameters(), module_b.parameters()):
        a, b = opt_a.state[p], opt_b.state[q]
        assert set(a) == set(b), name
        for key in a:
            assert a[key].dtype == b[key].dtype, f"{name}:{key} is {b[key].dtype}, was {a[key].dtype}"
            assert torch.equal(a[key], b[key]), f"{name}:{key} changed across state_dict/load_state_dict"


# Torch refuses a gradient whose dtype differs from the parameter's unless the parameter's
# grad_dtype is set (to the gradient's dtype, or None for any), as mixed-precision setups do.
@pytest.mark.parametrize("param_dtype, grad_dtype", [(torch.float32, BF16), (BF16, torch.float32)],
                         ids=["fp32_params_bf16_grads", "bf16_params_fp32_grads"])
def test_gradient_dtype_differs_from_parameter(param_dtype, grad_dtype):
    module = make_module(param_dtype)
    for p in module.parameters():
        p.grad_dtype = grad_dtype
    opt = dm.DistMuon(groups_of(module), **HYPER)
    if param_dtype == BF16:
        _assert_close_to_fp32_math(*_compare_with_fp32_math(module, opt, steps=3, grad_dtype=grad_dtype))
        return
    # fp32 parameters, bf16 gradients: the gradient's values are exact in fp32, so the step must
    # be the fp32 step with the gradient cast up (fp32 rounding only).
    reference = make_module(param_dtype)
    ref_opt = dm.DistMuon(groups_of(reference), **HYPER)
    for step in range(3):
        before = {n: p.detach().double().clone() for n, p in module.named_parameters()}
        _set_grads(module, step, grad_dtype)
        for p, q in zip(module.parameters(), reference.parameters()):
            assert p.grad.dtype == grad_dtype
            q.grad = p.grad.to(param_dtype)
        opt.step()
        ref_opt.step()
        for (name, p), q in zip(module.named_parameters(), reference.parameters()):
            delta, delta_ref = p.detach().double() - before[name], q.detach().double() - before[name]
            assert float((delta - delta_ref).norm()) <= 1e-6 * float(delta_ref.norm()), (step, name)


# ----------------------------------------------------------------------------- FSDP (gloo pool)


def _fsdp_module(world: int, seed: int = 0) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    return fully_shard(make_module(seed=seed), mesh=mesh)


def _fsdp_entries(world: int) -> list[layouts.Entry]:
    fulls = {n: p.detach().clone() for n, p in make_module().named_parameters()}
    module = _fsdp_module(world)
    return [layouts.Entry(n, p, fulls[n], {"algorithm": SPECS[n][1]}) for n, p in module.named_parameters()]


def _fsdp_vs_single(world: int, grad_dtype=None):
    """Distributed bf16 step vs the single-process bf16 step on full tensors, update by update."""
    entries = _fsdp_entries(world)
    updates = []
    hyper = {k: v for k, v in HYPER.items() if k != "ns_dtype"}
    opt, ref, reference = layouts.run_both(entries, steps=3, common={"ns_dtype": torch.float32}, updates=updates,
                                           grad_dtype=grad_dtype, **hyper)
    dtypes = {e.name: ({k: v.dtype for k, v in opt.state[e.param].items()}, e.param.dtype) for e in entries}
    # Per step and parameter: elements that differ at all, the largest difference in bf16 spacings
    # of the parameter, and the update's norm (it must not be zero).
    errors = {(s, name): (int((d != r).sum()), float(((d - r).abs() / ulp(after)).max()), float(r.norm()))
              for s, step in enumerate(updates) for name, (d, r, after) in step.items()}
    return errors, dtypes


@pytest.mark.parametrize("grad_dtype", [None, torch.float32], ids=["bf16_grads", "fp32_grads"])
def test_bf16_fsdp_step_equals_single_process(pool2, grad_dtype):
    errors, dtypes = pool2.run(_fsdp_vs_single, 2, grad_dtype)[0]
    for name, (state, param) in dtypes.items():
        assert param == BF16 and state == STATE_DTYPES[SPECS[name][1]], (name, state)
    assert {name for _, name in errors} == set(SPECS)
    assert all(norm > 0 for _, _, norm in errors.values())
    # Both sides compute the same fp32 values up to fp32 rounding (~1e-6 of the update, see
    # test_sharding_invariance) and round them to bf16, so almost every element is bitwise equal;
    # an fp32 difference can flip the rounding of an element by one bf16 spacing (measured: one
    # element in 3 steps). A distributed error of 1e-4 of the update already flips 5-20% of the
    # elements of the parameters that travel between ranks.
    bad = {k: v for k, v in errors.items() if v[0] > 2 or v[1] > 1.0}
    assert not bad, f"distributed bf16 updates differ from the single-process step (elements, spacings): {bad}"


def _dcp_resume(root: str):
    """Train 2 steps, save (DCP), keep going to step 5; then load into a fresh model and optimizer
    and train 2→5 again. Returns comparisons of the loaded and the final states."""
    from torch.distributed.tensor import DTensor

    from dist_muon import checkpoint as ck

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    def snapshot(module, opt):
        out = {f"param:{n}": full(p.detach()).clone() for n, p in module.named_parameters()}
        for n, p in module.named_parameters():
            out.update({f"state:{n}:{k}": full(v).clone() for k, v in opt.state[p].items()})
        return out

    def train(module, opt, start, stop):
        for step in range(start, stop):
            for name, p in module.named_parameters():
                p.grad = layouts._shard_like(grad_for(name, p.shape, step).to(p.dtype), p)
            opt.step()

    def build(seed):
        module = _fsdp_module(2, seed)
        return module, dm.DistMuon(groups_of(module), **HYPER)

    module, opt = build(0)
    train(module, opt, 0, 2)
    path = ck.save_checkpoint(root, 2, module, opt)
    saved = snapshot(module, opt)
    train(module, opt, 2, 5)
    final = snapshot(module, opt)

    module2, opt2 = build(500)  # other values: everything must come from the checkpoint
    assert ck.load_checkpoint(path, module2, opt2)["step"] == 2
    loaded = snapshot(module2, opt2)
    train(module2, opt2, 2, 5)
    resumed = snapshot(module2, opt2)

    def diff(a, b):
        return {k: (str(a[k].dtype), str(b[k].dtype), torch.equal(a[k], b[k])) for k in a}

    return diff(saved, loaded), diff(final, resumed)


def test_bf16_dcp_resume_keeps_dtypes_and_values(pool2, tmp_path):
    root = str(tmp_path / "bf16")
    loaded, resumed = pool2.run(_dcp_resume, root)[0]
    assert any(k.startswith("state:muown:magnitude") for k in loaded)
    for what, comparison in (("loaded", loaded), ("resumed", resumed)):
        bad = {k: v for k, v in comparison.items() if v[0] != v[1] or not v[2]}
        assert not bad, f"{what} differs from the uninterrupted run (saved dtype, loaded dtype, bitwise equal): {bad}"
    for key, (dtype, _, _) in loaded.items():
        if key.startswith("state:"):
            _, name, k = key.split(":")
            assert dtype == str(STATE_DTYPES[SPECS[name][1]][k]), key
