"""DistMuon as a torch.optim.Optimizer: what code written for torch.optim relies on.

The checks follow what PyTorch's generic optimizer tests (test/test_optim.py) ask of every optimizer:
copies, non-contiguous and named parameters, per-group and tensor learning rates, constructor options
as group keys, hooks, state dicts (weights_only loads, older formats), zero_grad, add_param_group, LR
schedulers, closures, printing and no-op steps. Every test compares DistMuon's update with a
reference computed here: the same optimizer built the ordinary way, torch.optim's AdamW or
closed-form values. The distributed tests (one W=2 pool) run each point on every layout in one optimizer:
FSDP2, HSDP (two replicas), TP alone, EP (experts on their own mesh), plus DTensors with non-contiguous
local shards and DDP-style replicas.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import dist_muon as dm
from dist_muon.optimizer import copying

FP32 = dict(ns_dtype=torch.float32)


def _params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _grads(shapes, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(*s, generator=g) for s in shapes]


def _all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _step_with(opt, grads):
    """Give the optimizer's parameters (in group order) copies of ``grads`` and step; returns the updates."""
    params = _all_params(opt)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = torch.empty_like(p).copy_(g)  # the parameter's own layout, as autograd makes it
    opt.step()
    return [p.detach() - b for p, b in zip(params, before)]


def _same_steps(a, b, steps=3, first=0, exact=True, tol=1e-6):
    """Step two optimizers over equal parameters with equal gradients; their updates must agree."""
    shapes = [p.shape for p in _all_params(a)]
    assert shapes == [p.shape for p in _all_params(b)]
    for step in range(first, first + steps):
        grads = _grads(shapes, step)
        for i, (u, v) in enumerate(zip(_step_with(a, grads), _step_with(b, grads))):
            if exact:
                assert torch.equal(u, v), (step, i, float((u - v).abs().max()))
            else:
                assert float((u - v).norm() / v.norm().clamp_min(1e-30)) < tol, (step, i)


def _mixed(seed=0, muown=True):
    """Every algorithm, views included."""
    w, qkv, experts, b, n, m = _params((8, 12), (12, 6), (2, 5, 7), (8,), (6, 10), (9, 6), seed=seed)
    groups = [
        {"params": [w, experts], "param_names": ["w", "experts"], "algorithm": "muon"},
        {"params": [qkv], "param_names": ["qkv"], "algorithm": "muon", "split_sizes": (6, 3, 3)},
        {"params": [b], "param_names": ["b"], "algorithm": "adamw"},
        {"params": [n], "param_names": ["n"], "algorithm": "normuon"},
    ]
    if muown:
        groups.append({"params": [m], "param_names": ["m"], "algorithm": "muown"})
    return groups


def _clone_groups(groups, transform=lambda p: nn.Parameter(p.detach().clone())):
    return [{**g, "params": [transform(p) for p in g["params"]]} for g in groups]


# ----------------------------------------------------------------------------- copies


COPY_SETTINGS = dict(lr=0.03, weight_decay=0.1, adamw_lr=2e-3, nonfinite_grad="skip", owner_policy="round_robin",
                     bucket_bytes=1500, **FP32)


ROUND_TRIPS = {"deepcopy": copy.deepcopy, "pickle": lambda opt: pickle.loads(pickle.dumps(opt))}


def _round_trips(opt):
    return {how: make(opt) for how, make in ROUND_TRIPS.items()}


def _counts(stats):
    """A step's statistics without its timings."""
    return {k: v for k, v in stats.as_dict().items() if not k.endswith("seconds")}


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_copies_keep_every_setting_and_step_like_the_original(cuda_graph):
    opt = dm.DistMuon(_mixed(muown=not cuda_graph), cuda_graph=cuda_graph, **COPY_SETTINGS)
    _same_steps(opt, dm.DistMuon(_clone_groups(opt.param_groups), cuda_graph=cuda_graph, **COPY_SETTINGS), steps=2)
    for how, make in ROUND_TRIPS.items():
        twin = make(opt)
        for key in ("nonfinite_grad", "owner_policy", "bucket_bytes", "compile_ns", "cuda_graph", "defaults",
                    "_group_defaults"):
            assert getattr(twin, key) == getattr(opt, key), (how, key)
        assert _counts(twin.last_step_stats) == _counts(opt.last_step_stats), how
        assert set(vars(twin)) == set(vars(opt)), (how, set(vars(opt)) ^ set(vars(twin)))
        # rebuilt from the copy's own parameters, never shared
        assert twin._runner is not opt._runner and twin._runner.workspace is not opt._runner.workspace, how
        assert twin.plan is not opt.plan and twin.plan.describe() == opt.plan.describe(), how
        assert not set(map(id, _all_params(twin))) & set(map(id, _all_params(opt))), how
        # the copy steps first: the original must not move (nothing shared), then both take the same step
        snapshot = [p.detach().clone() for p in _all_params(opt)]
        grads = _grads([p.shape for p in snapshot], 50)
        copied = _step_with(twin, grads)
        assert all(torch.equal(p, s) for p, s in zip(_all_params(opt), snapshot)), how
        ours = _step_with(opt, grads)
        assert all(torch.equal(a, b) for a, b in zip(copied, ours)), how
        assert all(torch.equal(p, q) for p, q in zip(_all_params(opt), _all_params(twin))), how


def test_copies_of_low_precision_state_and_mixed_blocks_step_like_the_original():
    """state_dtype (bf16 state on a scratch) and block_algorithms (AdamW rows) survive a copy: the
    copy's scratch is its own and its steps equal the original's."""
    fused, w = _params((12, 6), (8, 12), seed=3)
    groups = [{"params": [fused], "param_names": ["in_proj"], "algorithm": "muon", "split_sizes": (4, 4, 2, 2),
               "block_algorithms": ("muon", "muon", "adamw", "adamw"), "adamw_lr": 4e-3},
              {"params": [w], "param_names": ["w"], "algorithm": "muon"}]
    opt = dm.DistMuon(groups, lr=0.03, state_dtype=torch.bfloat16, **FP32)
    _step_with(opt, _grads([fused.shape, w.shape], 0))
    for how, make in ROUND_TRIPS.items():
        twin = make(opt)
        assert twin._scratch is not opt._scratch, how
        assert all(s["momentum_buffer"].dtype == torch.bfloat16 for s in twin.state.values()), how
        _same_steps(opt, twin, steps=2, first=1 + 10 * len(how))


def test_a_copy_has_no_hooks_as_in_torch():
    (w,) = _params((4, 6))
    calls = []
    ours = dm.DistMuon([{"params": [w]}], lr=0.1)
    theirs = torch.optim.SGD(_params((4, 6)), lr=0.1)
    for opt in (ours, theirs):
        opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    assert [len(copy.deepcopy(o)._optimizer_step_pre_hooks) for o in (ours, theirs)] == [0, 0]


def test_copies_load_state_dicts_and_change_settings_independently():
    opt = dm.DistMuon(_mixed(), **COPY_SETTINGS)
    twin = copy.deepcopy(opt)
    twin.bucket_bytes = 1 << 20  # a new plan for the copy only
    _same_steps(opt, twin, steps=1, exact=False, tol=1e-5)  # other buckets batch other stacks: rounding
    assert twin.plan.describe() != opt.plan.describe() and len(opt.plan.buckets) > 1
    restored = pickle.loads(pickle.dumps(opt))
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    _same_steps(opt, restored, steps=1, first=7)


# ----------------------------------------------------------------------------- non-contiguous parameters


def _non_contiguous(seed=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "strided": r(8, 12, 2)[..., 0],  # torch's test_optim case: strides (24, 2)
        "transposed": r(12, 8).t(),
        "channels_last": r(6, 2, 3, 3).to(memory_format=torch.channels_last),
        "experts": r(3, 7, 5).transpose(1, 2),
        "fused": r(16, 6).t().contiguous().t()[::1],  # dense, column-major, split into blocks
    }


@pytest.mark.parametrize("algorithm, cuda_graph", [("muon", False), ("muon", True), ("normuon", False),
                                                   ("normuon", True), ("muown", False), ("adamw", False)])
def test_non_contiguous_params_get_the_update_of_a_contiguous_copy(algorithm, cuda_graph):
    tensors = _non_contiguous()
    if algorithm == "muown":
        tensors.pop("channels_last")  # a conv weight as Muown rows needs its view; covered by muon
    assert not any(t.is_contiguous() for t in tensors.values())
    views = {"fused": {"split_sizes": (8, 4, 4)}} if algorithm != "adamw" else {}

    def groups(make):
        return [{"params": [make(t)], "param_names": [n], "algorithm": algorithm, **views.get(n, {})}
                for n, t in tensors.items()]

    kw = dict(lr=0.05, weight_decay=0.1, cuda_graph=cuda_graph, **FP32)
    strided = dm.DistMuon(groups(nn.Parameter), **kw)  # the tensors themselves: a clone of a strided one is dense
    assert not any(p.is_contiguous() for p in _all_params(strided))
    dense = dm.DistMuon(groups(lambda t: nn.Parameter(t.contiguous())), **kw)
    # Muown recomposes W from fp32 factors whose reductions run in the memory order: rounding only
    _same_steps(strided, dense, exact=algorithm != "muown", tol=1e-5)
    assert not any(p.is_contiguous() for p in _all_params(strided)), "the parameters keep their layout"


# ----------------------------------------------------------------------------- named parameters


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8, bias=False)
        self.experts = nn.Parameter(torch.randn(2, 8, 4))
        self.gate = nn.Parameter(torch.randn(4, 8))
        self.gate.skip_orthogonalization = True
        self.output = nn.Linear(8, 12, bias=False)  # a head by name


def _model(seed=0):
    torch.manual_seed(seed)
    return _Block()


def _group_summary(opt):
    return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in opt.param_groups]


def test_named_parameters_give_build_param_groups_groups():
    model = _model()
    reference = dm.DistMuon(dm.build_param_groups(model), lr=0.02, **FP32)
    with pytest.warns(UserWarning, match="cannot be recognised"):
        named = dm.DistMuon(model.named_parameters(), lr=0.02, **FP32)
    assert _group_summary(named) == _group_summary(reference)
    # experts and the Linear weights to Muon; the tagged gate, the head named output, norm and biases to AdamW
    assert [(g["algorithm"], len(g["params"])) for g in named.param_groups] == [("muon", 3), ("adamw", 5)]
    # and the same step (on equal copies of the model)
    twin = _model()
    with pytest.warns(UserWarning):
        _same_steps(dm.DistMuon(twin.named_parameters(), lr=0.02, **FP32), reference, steps=2)


def test_named_params_in_group_dicts_are_param_names():
    model = _model()
    groups = dm.build_param_groups(model, rules=[(r"up\.weight$", {"split_sizes": (8, 8)})])
    reference = dm.DistMuon(groups, lr=0.02, **FP32)
    # named pairs instead of param_names, under a torch.compile prefix: build_param_groups's names
    named = [{**{k: v for k, v in g.items() if k not in ("params", "param_names")},
              "params": [(f"_orig_mod.{n}", p) for n, p in zip(g["param_names"], g["params"])]} for g in groups]
    ours = dm.DistMuon(named, lr=0.02, **FP32)
    assert _group_summary(ours) == _group_summary(reference)
    twin = _model()
    twin_groups = dm.build_param_groups(twin, rules=[(r"up\.weight$", {"split_sizes": (8, 8)})])
    twin_named = [{"params": list(zip(g.pop("param_names"), g.pop("params"))), **g} for g in twin_groups]
    _same_steps(dm.DistMuon(twin_named, lr=0.02, **FP32), reference, steps=2)
    # add_param_group takes named pairs too
    (extra,) = _params((5, 7), seed=9)
    ours.add_param_group({"params": [("extra.weight", extra)], "algorithm": "muon"})
    assert ours.param_groups[-1]["param_names"] == ["extra.weight"] and ours.param_groups[-1]["params"] == [extra]


@pytest.mark.parametrize("form", ["list", "group", "add_param_group"])
def test_mixed_named_and_unnamed_params_raise_value_error_as_torch(form):
    w, b = _params((4, 6), (4,))

    def attempt(make):
        if form == "list":
            return make([("w", w), b])
        if form == "group":
            return make([{"params": [("w", w), b]}])
        opt = make([{"params": [("w", w)]}])  # all groups named or none, as torch
        opt.add_param_group({"params": [b]})

    with pytest.raises(ValueError, match="with/without names") as theirs:
        attempt(lambda params: torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="with/without names") as ours:
        attempt(lambda params: dm.DistMuon(params, lr=0.1))
    assert str(theirs.value).split(".")[0] in str(ours.value)


# ----------------------------------------------------------------------------- learning rates


def test_lr_given_only_per_group():
    groups = [{"params": _params((8, 12)), "algorithm": "muon", "lr": 0.01},
              {"params": _params((12, 6), seed=1), "algorithm": "normuon", "lr": 0.02},
              {"params": _params((6,), seed=2), "algorithm": "adamw", "lr": 3e-3}]
    ours = dm.DistMuon(groups, weight_decay=0.1, **FP32)
    # the reference has a constructor lr that every group overrides
    reference = dm.DistMuon(_clone_groups(groups), lr=0.5, adamw_lr=0.5, weight_decay=0.1, **FP32)
    assert [g["lr"] for g in ours.param_groups] == [0.01, 0.02, 3e-3]
    _same_steps(ours, reference)
    with pytest.raises(ValueError, match=r"param group 1: no lr: give the group an lr or pass DistMuon\(adamw_lr"):
        dm.DistMuon([groups[0], {"params": _params((6,)), "algorithm": "adamw"}])


def _lr_groups(lr, adamw_lr, seed=0, muown=True):
    groups = _mixed(seed=seed, muown=muown)
    for g in groups:
        g["lr"] = adamw_lr if g["algorithm"] == "adamw" else lr
    return groups


# Learning rates exact in float32, so a tensor lr and a float lr must give bitwise equal steps.
LR, ADAMW_LR = 2.0**-5, 2.0**-9


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensor_lr_steps_like_the_float_lr(cuda_graph):
    kw = dict(weight_decay=0.1, cuda_graph=cuda_graph, **FP32)
    ours = dm.DistMuon(_mixed(muown=not cuda_graph), lr=torch.tensor(LR), adamw_lr=torch.tensor(ADAMW_LR), **kw)
    reference = dm.DistMuon(_mixed(muown=not cuda_graph), lr=LR, adamw_lr=ADAMW_LR, **kw)
    lrs = [g["lr"] for g in ours.param_groups]
    assert all(isinstance(lr, torch.Tensor) for lr in lrs) and len(set(map(id, lrs))) == len(lrs), "one per group"
    _same_steps(ours, reference, steps=2)
    # changed in place (what a scheduler or a compiled loop does): the next step uses the new value
    for g, r in zip(ours.param_groups, reference.param_groups):
        g["lr"].mul_(0.25)
        r["lr"] = float(g["lr"])
    _same_steps(ours, reference, steps=2, first=2)
    with pytest.raises(ValueError, match="1-element floating-point tensor"):
        dm.DistMuon(_mixed(), lr=torch.tensor([0.1, 0.2]))


def test_tensor_lr_survives_state_dict_and_weights_only_load():
    ours = dm.DistMuon(_mixed(), lr=torch.tensor(LR), adamw_lr=torch.tensor(ADAMW_LR), **FP32)
    reference = dm.DistMuon(_mixed(), lr=LR, adamw_lr=ADAMW_LR, **FP32)
    _same_steps(ours, reference, steps=2)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all(isinstance(g["lr"], torch.Tensor) for g in saved["param_groups"])
    loaded = dm.DistMuon(_clone_groups(ours.param_groups), lr=0.5, adamw_lr=0.5, **FP32)
    loaded.load_state_dict(saved)  # the saved (tensor) values win, as in torch.optim
    assert [float(g["lr"]) for g in loaded.param_groups] == [float(g["lr"]) for g in ours.param_groups]
    _same_steps(loaded, reference, steps=2, first=2)


@pytest.mark.parametrize("scheduler", ["lambda", "step", "cosine"])
def test_lr_schedulers_drive_float_and_tensor_lrs(scheduler):
    def make(opt):
        if scheduler == "lambda":  # one lambda per group: each group's lr its own
            return torch.optim.lr_scheduler.LambdaLR(opt, [lambda s, k=k: 0.9 ** (s * (k + 1))
                                                           for k in range(len(opt.param_groups))])
        if scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)

    tensor_lr = dm.DistMuon(_mixed(), lr=torch.tensor(LR), adamw_lr=torch.tensor(ADAMW_LR), **FP32)
    float_lr = dm.DistMuon(_mixed(), lr=LR, adamw_lr=ADAMW_LR, **FP32)
    by_hand = dm.DistMuon(_mixed(), lr=LR, adamw_lr=ADAMW_LR, **FP32)  # lrs set from the scheduler's formula
    schedulers = [make(tensor_lr), make(float_lr)]
    expected = make(torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]} for _ in by_hand.param_groups],
                                    lr=1.0))
    bases = [g["lr"] for g in by_hand.param_groups]
    for step in range(4):
        grads = _grads([p.shape for p in _all_params(by_hand)], step)
        updates = [_step_with(o, grads) for o in (tensor_lr, float_lr, by_hand)]
        # a tensor lr is float32 (torch's schedulers compute it so); a float lr float64
        for u, v, r in zip(*updates):
            for d in (u, v):
                assert float((d - r).norm() / r.norm()) < 1e-5, step
        expected.optimizer.step()
        for s in schedulers + [expected]:
            s.step()
        for g, base, e in zip(by_hand.param_groups, bases, expected.optimizer.param_groups):
            g["lr"] = base * e["lr"]
        for t, f, h in zip(tensor_lr.param_groups, float_lr.param_groups, by_hand.param_groups):
            assert float(t["lr"]) == pytest.approx(h["lr"], rel=1e-6) and f["lr"] == pytest.approx(h["lr"], rel=1e-12)
    assert isinstance(tensor_lr.param_groups[0]["lr"], torch.Tensor)


# ----------------------------------------------------------------------------- constructor options as group keys


def test_constructor_options_are_group_keys_where_they_mean_something():
    with_constructor_keys = _mixed()
    own_keys = _mixed()
    adamw_keys = dict(adamw_lr=4e-3, adamw_betas=(0.8, 0.99), adamw_eps=1e-6, adamw_weight_decay=0.02)
    for g, h in zip(with_constructor_keys, own_keys):
        if g["algorithm"] == "adamw":
            g.update(adamw_keys)
            h.update(lr=4e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02)
        if g["algorithm"] == "normuon":
            g.update(normuon_beta2=0.9, normuon_eps=1e-6)
            h.update(beta2=0.9, eps=1e-6)
        if g["algorithm"] == "muown":
            g.update(adamw_betas=(0.85, 0.9), adamw_eps=1e-7)
            h.update(betas=(0.85, 0.9), eps=1e-7)
    ours = dm.DistMuon(with_constructor_keys, lr=0.03, **FP32)
    reference = dm.DistMuon(own_keys, lr=0.03, **FP32)
    assert [s[0] for s in _group_summary(ours)] == [s[0] for s in _group_summary(reference)]
    assert all("adamw_betas" not in g for g in ours.param_groups), "stored as the group's own keys"
    _same_steps(ours, reference)
    # and the AdamW group is torch's AdamW with those values
    (b,) = [g for g in ours.param_groups if g["algorithm"] == "adamw"][0]["params"]
    theirs = nn.Parameter(b.detach().clone())
    adamw = torch.optim.AdamW([theirs], lr=4e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02)
    adamw.load_state_dict({"state": {0: copy.deepcopy(ours.state[b])}, "param_groups": [
        {**adamw.param_groups[0], "params": [0]}]})
    grad = torch.randn(b.shape)
    before = b.detach().clone()
    b.grad, theirs.grad = grad.clone(), grad.clone()
    ours.step(), adamw.step()
    torch.testing.assert_close(b.detach() - before, theirs.detach() - before, rtol=1e-6, atol=0)


def test_build_param_groups_overrides_named_like_arguments_reach_the_groups_they_concern():
    model = _model()
    groups = dm.build_param_groups(model, adamw_betas=(0.7, 0.9), adamw_lr=1e-3)
    opt = dm.DistMuon(groups, lr=0.02, **FP32)
    as_arguments = dm.DistMuon(dm.build_param_groups(_model()), lr=0.02, adamw_betas=(0.7, 0.9), adamw_lr=1e-3,
                               **FP32)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in as_arguments.param_groups]
    _same_steps(opt, as_arguments, steps=2)


@pytest.mark.parametrize(
    "algorithm, options, match",
    [
        ("muon", {"adamw_lr": 1e-3}, r"'adamw_lr' means nothing in a muon group .*use 'lr'"),
        ("muon", {"adamw_weight_decay": 0.1}, r"use 'weight_decay'"),
        ("muon", {"adamw_betas": (0.9, 0.95)}, r"a muon group has no betas: set algorithm='adamw' and use 'betas'"),
        ("normuon", {"adamw_eps": 1e-6}, r"'adamw_eps' means nothing in a normuon group .*use 'eps'"),
        ("adamw", {"normuon_beta2": 0.9}, r"an? adamw group has no beta2: set algorithm='normuon' and use 'beta2'"),
        ("muown", {"normuon_eps": 1e-6}, r"use 'eps'"),
        ("adamw", {"adamw_lr": 1e-3, "lr": 2e-3}, r"adamw_lr=0.001 and lr=0.002 set the same value; give one"),
        ("muon", {"bucket_bytes": 1 << 20},
         r"'bucket_bytes' is an optimizer-wide setting.*DistMuon\(\.\.\., bucket_bytes"),
        ("adamw", {"nonfinite_grad": "skip"}, r"DistMuon\(\.\.\., nonfinite_grad=\.\.\.\)"),
    ],
)
def test_constructor_options_that_mean_nothing_in_a_group_name_the_key_to_use(algorithm, options, match):
    (p,) = _params((6, 8) if algorithm != "adamw" else (6,))
    with pytest.raises(ValueError, match=match):
        dm.DistMuon([{"params": [p], "algorithm": algorithm, **options}], lr=0.02)


# ----------------------------------------------------------------------------- deliberate differences (docs)


def test_deliberate_differences_are_refused_naming_what_to_do():
    c = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    theirs = torch.optim.Muon([c], lr=0.1)
    c.grad = torch.randn_like(c)
    with pytest.raises(RuntimeError, match="complex"):
        theirs.step()  # torch's Muon refuses them too
    for algorithm in ("muon", "adamw"):
        with pytest.raises(ValueError, match="complex parameters are not supported.*real parameters"):
            dm.DistMuon([{"params": [c], "algorithm": algorithm}], lr=0.1)
    w, b = _params((4, 6), (4,))
    with pytest.raises(ValueError, match="mixes matrices and vectors without an 'algorithm'; set algorithm or split"):
        dm.DistMuon([{"params": [w, b]}], lr=0.1)
    for key, hint in (("maximize", "negated objective"), ("capturable", r"cuda_graph=True"), ("foreach", "drop")):
        with pytest.raises(ValueError, match=f"'{key}' is a torch.optim option DistMuon does not have: .*{hint}"):
            dm.DistMuon([{"params": [w], key: True}], lr=0.1)
    # maximize is the negated objective: the same step with negated gradients, for Muon and AdamW alike
    ours = dm.DistMuon(_mixed(muown=False), lr=0.03, **FP32)
    negated = dm.DistMuon(_mixed(muown=False), lr=0.03, **FP32)
    reference = torch.optim.AdamW([nn.Parameter(p.detach().clone()) for p in _all_params(ours)[3:4]], lr=0.03,
                                  betas=(0.9, 0.95), weight_decay=0.0, maximize=True)
    grads = _grads([p.shape for p in _all_params(ours)], 0)
    up, down = _step_with(ours, grads), _step_with(negated, [-g for g in grads])
    # the parameters are not negated, so p + u and p - u round differently: an ulp of p, no more
    assert all(float((u + d).norm() / u.norm()) < 1e-5 for u, d in zip(up, down))
    (theirs,) = _step_with(reference, grads[3:4])
    torch.testing.assert_close(down[3], theirs, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- what already worked


def test_step_and_state_dict_hooks_run_as_in_torch():
    def log_hooks(opt, log):
        opt.register_step_pre_hook(lambda o, args, kwargs: log.append("step pre"))
        opt.register_step_post_hook(lambda o, args, kwargs: log.append("step post"))
        opt.register_state_dict_pre_hook(lambda o: log.append("state_dict pre"))
        opt.register_state_dict_post_hook(lambda o, sd: sd.setdefault("extra", 7) and None)
        opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(f"load pre {sd.pop('extra')}"))
        opt.register_load_state_dict_post_hook(lambda o: log.append("load post"))
        opt.register_load_state_dict_pre_hook(lambda o, sd: log.append("load pre first"), prepend=True)

    ours, theirs = [], []
    opt = dm.DistMuon([{"params": _params((4, 6)), "algorithm": "adamw", "betas": (0.9, 0.999), "weight_decay": 0.01}],
                      lr=1e-2, **FP32)
    ref = torch.optim.AdamW(_params((4, 6)), lr=1e-2)  # its defaults: betas (0.9, 0.999), weight decay 0.01
    for o, log in ((opt, ours), (ref, theirs)):
        log_hooks(o, log)
        _step_with(o, _grads([(4, 6)], 0))
        sd = o.state_dict()
        assert sd["extra"] == 7
        o.load_state_dict(sd)
    assert ours == theirs == ["step pre", "step post", "state_dict pre", "load pre first", "load pre 7", "load post"]
    torch.testing.assert_close(_all_params(opt)[0], _all_params(ref)[0], rtol=1e-6, atol=0)


def test_state_dict_round_trips_through_weights_only_torch_load():
    opt = dm.DistMuon(_mixed(), lr=0.03, adamw_lr=2e-3, **FP32)
    _same_steps(opt, dm.DistMuon(_mixed(), lr=0.03, adamw_lr=2e-3, **FP32), steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = dm.DistMuon(_clone_groups(opt.param_groups), lr=0.03, adamw_lr=2e-3, **FP32)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    _same_steps(loaded, opt, steps=2, first=2)
    assert opt.state_dict()["param_groups"] == loaded.state_dict()["param_groups"]


def test_loading_older_state_dicts():
    # torch.optim's older formats: steps as Python numbers, groups without param_names, and (ours) no
    # `interleave` key, which groups carry only when set
    opt = dm.DistMuon(_mixed(), lr=0.03, adamw_lr=2e-3, **FP32)
    reference = dm.DistMuon(_mixed(), lr=0.03, adamw_lr=2e-3, **FP32)
    _same_steps(opt, reference, steps=2)
    old = copy.deepcopy(opt.state_dict())
    for state in old["state"].values():
        if "step" in state:
            state["step"] = state["step"].item()
    for g in old["param_groups"]:
        g.pop("param_names"), g.pop("interleave", None)
    loaded = dm.DistMuon(_clone_groups(opt.param_groups), lr=0.03, adamw_lr=2e-3, **FP32)
    loaded.load_state_dict(old)
    assert all(isinstance(s["step"], torch.Tensor) for s in loaded.state.values() if "step" in s)
    assert [g["param_names"] for g in loaded.param_groups] == [g["param_names"] for g in opt.param_groups]
    _same_steps(loaded, reference, steps=2, first=2)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_both_ways(set_to_none):
    lr, wd = 0.05, 0.1
    (w,) = _params((6, 8))
    start = w.detach().clone()
    opt = dm.DistMuon([{"params": [w], "algorithm": "muon"}], lr=lr, weight_decay=wd, **FP32)
    w.grad = torch.randn_like(w)
    opt.zero_grad(set_to_none=set_to_none)
    assert (w.grad is None) if set_to_none else (w.grad is not None and not w.grad.any())
    opt.step()
    # no gradient: no update at all (as torch.optim); a zero gradient: decoupled weight decay only
    expected = start if set_to_none else start * (1 - lr * wd)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-7, atol=0)
    assert not opt.state[w]["momentum_buffer"].any()


def test_steps_without_gradients_are_no_ops():
    opt = dm.DistMuon(_mixed(), lr=0.03, weight_decay=0.1, **FP32)
    before = [p.detach().clone() for p in _all_params(opt)]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(_all_params(opt), before))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k][key], v) for k, s in state.items() for key, v in s.items())
    assert opt.last_step_stats is not None


def test_add_param_group_equals_building_with_every_group():
    late = dm.DistMuon(_mixed()[:2], lr=0.03, adamw_lr=2e-3, **FP32)
    for g in _mixed()[2:]:
        late.add_param_group(g)
    _same_steps(late, dm.DistMuon(_mixed(), lr=0.03, adamw_lr=2e-3, **FP32))
    with pytest.raises(ValueError, match="more than one parameter group"):
        late.add_param_group({"params": late.param_groups[0]["params"][:1], "param_names": ["again"],
                              "algorithm": "muon"})


def test_closure_is_evaluated_with_grad_enabled_and_its_loss_returned():
    model = _model()
    opt = dm.DistMuon(dm.build_param_groups(model), lr=0.02, **FP32)
    twin = _model()
    reference = dm.DistMuon(dm.build_param_groups(twin), lr=0.02, **FP32)
    x = torch.randn(3, 8)

    def loss_of(m):
        return m.output(m.down(torch.relu(m.up(m.norm(x))))).square().mean() + m.gate.sum() + m.experts.sum()

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    with torch.no_grad():  # step() must enable grad for the closure
        loss = opt.step(closure)
    expected = loss_of(twin)
    expected.backward()
    reference.step()
    assert loss.item() == expected.item()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_printing_shows_every_group_like_torch():
    opt = dm.DistMuon(_mixed(), lr=0.03, **FP32)
    text = repr(opt)
    assert text == torch.optim.Optimizer.__repr__(opt)
    assert text.count("Parameter Group") == len(opt.param_groups)
    for g in opt.param_groups:
        assert f"algorithm: {g['algorithm']}" in text and f"param_names: {g['param_names']}" in text


# ----------------------------------------------------------------------------- every layout


def _contract_groups(entries, params, lr_of):
    """The torch.optim forms at once: named pairs in group dicts, a tensor lr in every group and
    no constructor lr, and constructor-named keys in the groups they concern."""
    groups = []
    for e, p in zip(entries, params):
        options = dict(e.options)
        algorithm = options.setdefault("algorithm", "muon" if e.full.ndim >= 2 else "adamw")
        group = {"params": [(e.name, p)], **options, "lr": torch.tensor(lr_of(algorithm))}
        if algorithm == "adamw":
            group.update(adamw_betas=(0.8, 0.99), adamw_weight_decay=0.02)
        if algorithm == "muown":
            group["adamw_eps"] = 1e-7
        groups.append(group)
    return groups


def _ordinary_groups(entries, params, lr_of):
    """The same optimizer written the ordinary way: param_names, float lrs, the groups' own keys."""
    groups = []
    for e, p in zip(entries, params):
        options = dict(e.options)
        algorithm = options.setdefault("algorithm", "muon" if e.full.ndim >= 2 else "adamw")
        group = {"params": [p], "param_names": [e.name], **options, "lr": lr_of(algorithm)}
        if algorithm == "adamw":
            group.update(betas=(0.8, 0.99), weight_decay=0.02)
        if algorithm == "muown":
            group["eps"] = 1e-7
        groups.append(group)
    return groups


def _local(t):
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _set_grads(entries, params, step):
    import layouts

    for i, (e, p) in enumerate(zip(entries, params)):
        g = layouts.seeded(e.full.shape, 10_000 * (step + 1) + i)
        p.grad = layouts._shard_like(g, p) if hasattr(p, "device_mesh") else g.clone()


def _copies_step_like(opt, entries, step):
    """deepcopy and pickle ``opt``; each copy's step must equal the original's, shard by shard."""
    twins = _round_trips(opt)
    params = _all_params(opt)
    for twin in twins.values():
        assert twin._runner is not opt._runner and twin._comm.ranks == opt._comm.ranks
        _set_grads(entries, _all_params(twin), step)
    _set_grads(entries, params, step)
    before = [_local(p).detach().clone() for p in params]
    opt.step()
    ours = [_local(p).detach() - b for p, b in zip(params, before)]
    for how, twin in twins.items():
        twin.step()
        theirs = [_local(p).detach() - b for p, b in zip(_all_params(twin), before)]
        bad = [e.name for e, a, b in zip(entries, ours, theirs) if not torch.equal(a, b)]
        assert not bad, f"{how}: {bad}"
    return len(twins)


def _every_layout(world):
    """Every point at once on every layout, against the same optimizer written the ordinary way on one process;
    then deepcopy and pickle it: each copy's next step equals the original's."""
    import layouts

    entries = (layouts.fsdp_entries(world) + layouts.hsdp_entries(world) + layouts.tp_only_entries(world)
               + layouts.ep_entries(world))
    lr_of = {"muon": 0.05, "normuon": 0.04, "muown": 0.03, "adamw": 0.01}.get
    reference_params = [nn.Parameter(e.full.clone()) for e in entries]
    params = [e.param for e in entries]
    opt = dm.DistMuon(_contract_groups(entries, params, lr_of), weight_decay=0.1, bucket_bytes=4096, **FP32)
    ref = dm.DistMuon(_ordinary_groups(entries, reference_params, lr_of), weight_decay=0.1, bucket_bytes=4096, **FP32)
    assert [g["param_names"] for g in opt.param_groups] == [[e.name] for e in entries]
    updates = []
    for step in range(2):
        _set_grads(entries, params, step)
        _set_grads(entries, reference_params, step)
        before = layouts._fulls(entries, reference_params)
        opt.step(), ref.step()
        after = layouts._fulls(entries, reference_params)
        updates.append({n: (a[0] - b[0], a[1] - b[1], a[1]) for (n, a), b in zip(after.items(), before.values())})
    errors = layouts.update_errors(entries, opt, ref, reference_params, updates)
    assert all(e.name in errors for e in entries)
    copies = _copies_step_like(opt, entries, step=2)
    return max(errors.values()), copies, sorted({e.name.split(".")[0] for e in entries})


def test_every_layout_every_point_and_fsdp_copies_step_like_the_original(pool2):
    # FSDP, HSDP (2 replicas), TP and EP (experts on their own mesh) at W=2, in one optimizer
    for worst, copies, layouts_seen in pool2.run(_every_layout, 2):
        assert worst <= 1e-5 and copies == 2 and layouts_seen == ["ep", "fsdp", "hsdp", "tp"], (worst, layouts_seen)


def _non_contiguous_dtensors_and_ddp(world):
    """DTensors whose local shards are not contiguous (from_local), and copies of a DDP-style optimizer
    (plain parameters, process_group=WORLD)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import layouts

    mesh = init_device_mesh("cpu", (world,))

    def dtensors(contiguous):
        out = []
        for i, (shape, placement) in enumerate([((8, 12), Shard(1)), ((3, 10, 6), Shard(0)), ((12, 6), Replicate())]):
            full = layouts.seeded(shape, 50 + i)
            local = distribute_tensor(full, mesh, [placement])._local_tensor
            if not contiguous:  # the same values, column-major in memory
                local = local.transpose(-1, -2).contiguous().transpose(-1, -2)
            out.append(nn.Parameter(DTensor.from_local(local, mesh, [placement], shape=full.shape,
                                                       stride=full.stride())))
        return out

    def groups(ps):
        return [{"params": [p], "param_names": [a], "algorithm": a} for p, a in zip(ps, ("muon", "normuon", "muown"))]

    strided, dense = dtensors(False), dtensors(True)
    assert not any(p._local_tensor.is_contiguous() for p in strided)
    opts = [dm.DistMuon(groups(ps), lr=0.05, weight_decay=0.1, **FP32) for ps in (strided, dense)]
    errors = {}
    for step in range(2):
        for ps in (strided, dense):
            for i, p in enumerate(ps):
                p.grad = layouts._shard_like(layouts.seeded(p.shape, 700 + 10 * step + i), p)
        before = [[p._local_tensor.clone() for p in ps] for ps in (strided, dense)]
        for o in opts:
            o.step()
        for g, a, b, a0, b0 in zip(groups(strided), strided, dense, *before):
            d, r = a._local_tensor - a0, b._local_tensor - b0
            errors[g["algorithm"]] = max(errors.get(g["algorithm"], 0.0), float((d - r).norm() / r.norm()))

    ddp = layouts.ddp_entries(world)
    opt = dm.DistMuon(layouts.groups_for(ddp, [e.param for e in ddp], FP32), lr=0.05, process_group=dist.group.WORLD)
    twins = _round_trips(opt)
    for o in (opt, *twins.values()):
        for i, (e, p) in enumerate(zip(ddp, _all_params(o))):
            p.grad = layouts.seeded(e.full.shape, 900 + i)
        o.step()
    same = {how: all(torch.equal(p, q) for p, q in zip(_all_params(opt), _all_params(t))) for how, t in twins.items()}
    groups_found = {how: t._comm.group is dist.group.WORLD for how, t in twins.items()}
    return errors, same, groups_found, opt.last_step_stats.matrices_owned


def test_non_contiguous_dtensors_and_copies_of_ddp_style_optimizers(pool2):
    results = pool2.run(_non_contiguous_dtensors_and_ddp, 2)
    for errors, same, groups_found, _ in results:
        # Muown's fp32 row-norm reductions run in memory order: rounding only; the others are bitwise equal
        assert errors["muon"] == errors["normuon"] == 0.0 and errors["muown"] <= 1e-5, errors
        assert all(same.values()) and all(groups_found.values()), (same, groups_found)
    assert all(r[3] > 0 for r in results), "the replicas split the matrices (a real 2-rank optimizer)"


def test_an_optimizer_whose_group_cannot_be_found_again_refuses_pickle_but_deep_copies():
    # process_group= a subgroup (here: ranks (0, 1) of a job that is not running) cannot travel in a pickle
    from dist_muon import comm

    opt = dm.DistMuon(_mixed(), lr=0.03, **FP32)
    sentinel = object()
    opt._comm = comm.CommGroup(sentinel, (0, 1), 0)
    with pytest.raises(TypeError, match=r"ranks \[0, 1\].*copy\.deepcopy\(optimizer\) works"):
        pickle.dumps(opt)
    assert copy.deepcopy(opt)._comm.group is sentinel, "a deepcopy shares the process group"


def test_copying_settings_cover_every_attribute_a_step_uses():
    # a new attribute in DistMuon.__init__ must be either a Settings field or rebuilt by copying.restore
    opt = dm.DistMuon(_mixed(), lr=0.03, **FP32)
    torch_own = set(vars(torch.optim.SGD(_params((2, 2)), lr=0.1)))
    settings = {"_group_defaults", "nonfinite_grad", "owner_policy", "bucket_bytes", "compile_ns", "cuda_graph",
                "qk_clip_threshold", "qk_clip_alpha", "last_step_stats"}
    assert set(vars(opt)) - torch_own == settings | set(copying.REBUILT)
