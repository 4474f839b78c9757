"""DistMuon on one process: the update rule, AdamW groups, views, API behaviour, bad input."""

import copy

import pytest
import torch
from torch import nn

import dist_muon as dm
from reference import muon_step64


def _params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_optim_muon_bf16(nesterov):
    ours = _params((32, 64), (64, 32), (48, 48))
    theirs = copy.deepcopy(ours)
    opt = dm.DistMuon([{"params": ours, "algorithm": "muon"}], lr=0.02, weight_decay=0.1, momentum=0.9,
                      nesterov=nesterov, ns_method="quintic", adjust_lr="original")
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn="original")
    for step in range(4):
        grads = _grads(ours, step)
        _set_grads(ours, grads), _set_grads(theirs, grads)
        opt.step(), ref.step()
    for a, b in zip(ours, theirs):
        assert (a - b).norm() / b.norm() < 2e-3
        assert (opt.state[a]["momentum_buffer"] - ref.state[b]["momentum_buffer"]).abs().max() < 1e-6


def _one_matrix(t):
    yield (slice(None),), t


@pytest.mark.parametrize("method", ["quintic", "polar_express"])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw", None])
def test_fp32_matches_fp64_design_rule(method, adjust_lr):
    params = _params((24, 40), (40, 24))
    hyper = dict(lr=0.03, momentum=0.95, nesterov=True, weight_decay=0.05)
    opt = dm.DistMuon([{"params": params, "algorithm": "muon"}], ns_method=method, adjust_lr=adjust_lr,
                      ns_dtype=torch.float32, **hyper)
    shadow = [(p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64)) for p in params]
    for step in range(3):
        grads = _grads(params, step)
        _set_grads(params, grads)
        before = [p.detach().double().clone() for p in params]
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            new, buf = muon_step64(shadow[i][0], g, shadow[i][1], method=method, adjust_lr=adjust_lr,
                                   matrices=_one_matrix, **hyper)
            ours, ref = p.detach().double() - before[i], new - shadow[i][0]
            assert (ours - ref).norm() / ref.norm() < 1e-4
            shadow[i] = (p.detach().double().clone(), buf)


def test_adamw_groups_match_torch_adamw():
    ours = _params((10, 6), (6,), (3, 4, 5))
    theirs = copy.deepcopy(ours)
    opt = dm.DistMuon([{"params": ours, "algorithm": "adamw", "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6,
                        "weight_decay": 0.02}], lr=0.5)
    ref = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02)
    for step in range(5):
        grads = _grads(ours, step)
        _set_grads(ours, grads), _set_grads(theirs, grads)
        opt.step(), ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_constructor_adamw_defaults_apply_to_adamw_groups():
    w, b = _params((8, 4), (8,))
    opt = dm.DistMuon([{"params": [w], "algorithm": "muon"}, {"params": [b], "algorithm": "adamw"}], lr=0.02,
                      weight_decay=0.1, adamw_lr=1e-3, adamw_betas=(0.85, 0.9), adamw_eps=1e-7, adamw_weight_decay=0.0)
    muon, adamw = opt.param_groups
    assert (muon["lr"], muon["weight_decay"]) == (0.02, 0.1)
    assert (adamw["lr"], adamw["betas"], adamw["eps"], adamw["weight_decay"]) == (1e-3, (0.85, 0.9), 1e-7, 0.0)
    plain = dm.DistMuon([{"params": [b], "algorithm": "adamw"}], lr=0.02, weight_decay=0.1)
    assert (plain.param_groups[0]["lr"], plain.param_groups[0]["weight_decay"]) == (0.02, 0.1)


def _views_vs_separate(fused_shape, view, pieces, fp32=True):
    """Step a fused parameter with a view and the same blocks as separate parameters; compare."""
    (fused,) = _params(fused_shape, seed=7)
    separate = [nn.Parameter(fused.detach()[idx].clone()) for idx in pieces]
    kw = dict(lr=0.05, weight_decay=0.1, ns_dtype=torch.float32, adjust_lr="original")
    opt_f = dm.DistMuon([{"params": [fused], "algorithm": "muon", **view}], **kw)
    opt_s = dm.DistMuon([{"params": separate, "algorithm": "muon"}], **kw)
    for step in range(3):
        (g,) = _grads([fused], step)
        fused.grad = g.clone()
        for p, idx in zip(separate, pieces):
            p.grad = g[idx].clone()
        opt_f.step(), opt_s.step()
    for p, idx in zip(separate, pieces):
        torch.testing.assert_close(fused.detach()[idx], p.detach(), rtol=1e-5, atol=1e-6)


def test_3d_experts_equal_separate_matrices():
    _views_vs_separate((3, 8, 20), {}, [(i,) for i in range(3)])


def test_num_experts_equals_separate_matrices():
    _views_vs_separate((3 * 8, 20), {"num_experts": 3}, [slice(8 * i, 8 * i + 8) for i in range(3)])


def test_unequal_split_sizes_equal_separate_matrices():
    _views_vs_separate((24 + 6 + 6, 24), {"split_sizes": (24, 6, 6)}, [slice(0, 24), slice(24, 30), slice(30, 36)])


def test_num_heads_equal_separate_matrices():
    _views_vs_separate((12, 8), {"num_heads": 4}, [slice(3 * i, 3 * i + 3) for i in range(4)])


def test_experts_with_fused_gate_up_split():
    _views_vs_separate((2, 12, 8), {"split_sizes": (6, 6)}, [(e, slice(s, s + 6)) for e in range(2) for s in (0, 6)])


def test_conv_weight_is_flattened():
    (conv,) = _params((6, 2, 3, 3))
    (flat,) = [nn.Parameter(conv.detach().reshape(6, 18).clone())]
    kw = dict(lr=0.05, ns_dtype=torch.float32)
    a = dm.DistMuon([{"params": [conv], "algorithm": "muon"}], **kw)
    b = dm.DistMuon([{"params": [flat], "algorithm": "muon"}], **kw)
    g = torch.randn(6, 2, 3, 3)
    conv.grad, flat.grad = g.clone(), g.reshape(6, 18).clone()
    a.step(), b.step()
    torch.testing.assert_close(conv.detach().reshape(6, 18), flat.detach(), rtol=1e-5, atol=1e-6)


def test_state_is_eager_and_state_dict_round_trips_exactly():
    params = _params((8, 12), (12,), (2, 4, 6))
    groups = [{"params": [params[0], params[2]], "algorithm": "muon"}, {"params": [params[1]], "algorithm": "adamw"},
              ]
    opt = dm.DistMuon(groups, lr=0.02)
    assert set(opt.state[params[0]]) == {"momentum_buffer"}
    assert set(opt.state[params[1]]) == {"step", "exp_avg", "exp_avg_sq"}
    for step in range(2):
        _set_grads(params, _grads(params, step))
        opt.step()
    clone = copy.deepcopy(params)
    opt2 = dm.DistMuon([{"params": [clone[0], clone[2]], "algorithm": "muon"},
                        {"params": [clone[1]], "algorithm": "adamw"}], lr=0.02)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(2, 4):
        grads = _grads(params, step)
        _set_grads(params, grads), _set_grads(clone, grads)
        opt.step(), opt2.step()
    for a, b in zip(params, clone):
        assert torch.equal(a, b)


def test_lr_scheduler_drives_each_group_and_closure_is_supported():
    w, b = _params((8, 4), (8,))
    opt = dm.DistMuon([{"params": [w], "algorithm": "muon"}, {"params": [b], "algorithm": "adamw"}], lr=0.02,
                      adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    calls = []

    def closure():
        calls.append(1)
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        return 3.0

    assert opt.step(closure) == 3.0 and calls
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.01, 5e-4]


def test_zero_lr_zero_grad_step_is_a_no_op_for_parameters():
    (w,) = _params((8, 4))
    before = w.detach().clone()
    opt = dm.DistMuon([{"params": [w], "algorithm": "muon"}], lr=0.0, weight_decay=0.1)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w, before)


def test_params_without_grad_are_left_alone():
    w, v = _params((8, 4), (4, 8))
    before = v.detach().clone()
    opt = dm.DistMuon([{"params": [w, v], "algorithm": "muon"}], lr=0.1, weight_decay=0.1)
    w.grad = torch.randn_like(w)
    opt.step()
    assert torch.equal(v, before) and not opt.state[v]["momentum_buffer"].any()


def test_plain_parameter_list_warns_and_routes_by_ndim():
    params = _params((8, 4), (4,))
    with pytest.warns(UserWarning, match="cannot be recognised"):
        opt = dm.DistMuon(params, lr=0.02)
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "adamw"]
    with pytest.warns(UserWarning, match="cannot be recognised"):
        named = dm.DistMuon([("w", params[0]), ("b", params[1])], lr=0.02)
    assert [(g["algorithm"], g["param_names"]) for g in named.param_groups] == [("muon", ["w"]), ("adamw", ["b"])]


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient_never_poisons_momentum(policy):
    w, b = _params((8, 4), (4,))
    opt = dm.DistMuon([{"params": [w], "algorithm": "muon"}, {"params": [b], "algorithm": "adamw"}], lr=0.1,
                      nonfinite_grad=policy)
    before = [w.detach().clone(), b.detach().clone()]
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    w.grad[0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
    else:
        with pytest.warns(UserWarning, match="skipped"):
            opt.step()
        assert opt.last_step_stats.skipped
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert not opt.state[w]["momentum_buffer"].any() and opt.state[b]["step"].item() == 0


@pytest.mark.parametrize(
    "group, match",
    [
        ({"split_sizes": (4, 4)}, r"w: split_sizes \(4, 4\) sum to 8 but dim 0 has size 12"),
        ({"num_experts": 5}, "w: num_experts=5 does not divide"),
        ({"num_heads": 5}, "w: num_heads=5 does not divide"),
        ({"algorithm": "lion"}, "unknown algorithm 'lion'"),
        ({"ns_method": "cubic"}, "unknown ns_method 'cubic'"),
        ({"adjust_lr": "spectral"}, "adjust_lr must be one of"),
        ({"lr": -1.0}, "lr must be a number"),
        ({"momentum": 1.5}, "momentum must be a number"),
        ({"ns_steps": 0}, "ns_steps must be a positive integer"),
        ({"bogus": 1}, r"unknown option\(s\) \['bogus'\]"),
    ],
)
def test_bad_configuration_names_the_parameter(group, match):
    (w,) = _params((12, 6))
    with pytest.raises(ValueError, match=match):
        dm.DistMuon([{"params": [w], "param_names": ["w"], "algorithm": "muon", **group}], lr=0.02)


def test_bad_input_types():
    with pytest.raises(ValueError, match="fewer than 2 dims"):
        dm.DistMuon([{"params": [nn.Parameter(torch.randn(4))], "param_names": ["b"], "algorithm": "muon"}], lr=0.1)
    with pytest.raises(ValueError, match="complex"):
        dm.DistMuon([{"params": [nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))]}], lr=0.1)
    with pytest.raises(ValueError, match="owner_policy"):
        dm.DistMuon([{"params": _params((4, 4))}], lr=0.1, owner_policy="random")
    with pytest.raises(ValueError, match="nonfinite_grad"):
        dm.DistMuon([{"params": _params((4, 4))}], lr=0.1, nonfinite_grad="ignore")
    (w,) = _params((4, 4))
    opt = dm.DistMuon([{"params": [w]}], lr=0.1)
    w.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_compile_ns_option_gives_the_same_step():
    a, b = _params((2, 16, 24)), _params((2, 16, 24))
    kw = dict(lr=0.05, ns_dtype=torch.float32)
    opt_a = dm.DistMuon([{"params": a}], compile_ns=True, **kw)
    opt_b = dm.DistMuon([{"params": b}], **kw)
    _set_grads(a, _grads(a, 0)), _set_grads(b, _grads(b, 0))
    opt_a.step(), opt_b.step()
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
