"""``state_dtype``: bf16 momentum and AdamW moments for fp32 parameters.

The contract: the math is fp32 and the state is stored rounded once per step. So every step is
compared with an fp32-math reference that starts from our (bf16) state and parameters: the new
state must be that reference's state rounded to bf16 (at most one bf16 spacing per element, the
bound for a reference whose arithmetic differs in the last fp32 bits), and the update must be the
reference's (fp32 Newton–Schulz, 1e-5). Also: single process against an independent fp64 /
``torch.optim.AdamW`` reference, FSDP and EP against the single-process fp32-state step, DCP
resume bit-exact, the graphed step, host ops, and the allocator-measured memory.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from torch import nn

import dist_muon as dm
import layouts
from reference import muon_step64

BF16 = torch.bfloat16
LR, WD, ADAMW_LR, MU = 0.05, 0.1, 0.01, 0.95
HYPER = dict(lr=LR, weight_decay=WD, adamw_lr=ADAMW_LR, momentum=MU, ns_dtype=torch.float32)
UPDATE_TOL = 1e-5  # fp32 Newton–Schulz against fp64 / the single-process step
ROUNDED_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def spacing(t: torch.Tensor) -> torch.Tensor:
    """bf16 spacing (ulp) at each element, in fp64."""
    a = t.detach().abs().to(BF16)
    return torch.nextafter(a, torch.full_like(a, float("inf"))).double() - a.double()


def rounding_error(ours: torch.Tensor, fp32_math: torch.Tensor) -> float:
    """Largest |ours − fp32 math| in bf16 spacings of the rounded reference (0.5 for exact rounding)."""
    return float(((ours.double() - fp32_math.double()).abs() / spacing(fp32_math)).max())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def grad_for(name: str, shape, step: int) -> torch.Tensor:
    return layouts.seeded(shape, zlib.crc32(name.encode()) + 7919 * step)


# ----------------------------------------------------------------------------- one process, independent reference


def test_bf16_state_single_process_against_fp64_muon_and_torch_adamw():
    torch.manual_seed(0)
    shapes = {"w": (12, 16), "tall": (14, 6), "bias": (16,), "embed": (20, 8)}
    params = {n: nn.Parameter(torch.randn(s) * 0.1) for n, s in shapes.items()}
    groups = [{"params": [params["w"], params["tall"]], "param_names": ["w", "tall"], "algorithm": "muon"},
              {"params": [params["bias"], params["embed"]], "param_names": ["bias", "embed"], "algorithm": "adamw"}]
    opt = dm.DistMuon(groups, **HYPER, state_dtype="bfloat16", bucket_bytes=1024)  # several scratch chunks
    assert {k: v.dtype for k, v in opt.state[params["w"]].items()} == {"momentum_buffer": BF16}
    assert {k: v.dtype for k, v in opt.state[params["bias"]].items()} == {
        "step": torch.float32, "exp_avg": BF16, "exp_avg_sq": BF16}
    for step in range(4):
        before = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for n, p in params.items()}
        grads = {n: grad_for(n, p.shape, step) for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
        for n in ("w", "tall"):
            p0, state0 = before[n]
            p_ref, buf_ref = muon_step64(p0, grads[n], state0["momentum_buffer"], lr=LR, momentum=MU, nesterov=True,
                                         weight_decay=WD, method="polar_express", adjust_lr="original",
                                         matrices=lambda t: [(slice(None), t)])
            assert rel(params[n].detach() - p0, p_ref - p0) <= UPDATE_TOL, (step, n)
            assert rounding_error(opt.state[params[n]]["momentum_buffer"], buf_ref) <= 1.0, (step, n)
        for n in ("bias", "embed"):  # torch.optim.AdamW on fp32 copies of our state
            p0, state0 = before[n]
            q = nn.Parameter(p0.clone())
            ref = torch.optim.AdamW([q], lr=ADAMW_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
            ref.state[q] = {k: v.float().clone() for k, v in state0.items()}
            q.grad = grads[n].clone()
            ref.step()
            assert torch.equal(params[n].detach(), q.detach()), (step, n)
            for k in ("exp_avg", "exp_avg_sq"):
                assert rounding_error(opt.state[params[n]][k], ref.state[q][k]) <= 1.0, (step, n, k)
            assert opt.state[params[n]]["step"] == ref.state[q]["step"]


# ----------------------------------------------------------------------------- FSDP and EP against the fp32-math step


def _bf16_state_vs_fp32_math(kind: str, steps: int = 3):
    """Every step: our distributed bf16-state step vs the single-process fp32-state step started from
    our parameters and our state (upcast, exact). Returns (update errors, rounding errors, dtypes)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    entries = layouts.fsdp_entries(world) if kind == "fsdp" else layouts.ep_entries(world)
    common = {"ns_dtype": torch.float32}
    options = dict(lr=LR, weight_decay=WD, adamw_lr=ADAMW_LR, bucket_bytes=4096)
    opt = dm.DistMuon(layouts.groups_for(entries, [e.param for e in entries], common), state_dtype=BF16, **options)
    reference = [nn.Parameter(e.full.clone()) for e in entries]
    ref = dm.DistMuon(layouts.groups_for(entries, reference, common), **options)
    updates, rounding = {}, {}
    for step in range(steps):
        with torch.no_grad():
            for e, r in zip(entries, reference):
                r.copy_(layouts.full_of(e.param))
                for k, v in opt.state[e.param].items():
                    ref.state[r][k].copy_(layouts.full_of(v))
        before = [r.detach().double().clone() for r in reference]
        for i, (e, r) in enumerate(zip(entries, reference)):
            g = layouts.seeded(e.full.shape, 10_000 * (step + 1) + i)
            r.grad, e.param.grad = g.clone(), layouts._shard_like(g, e.param)
        opt.step()
        ref.step()
        for e, r, b in zip(entries, reference, before):
            updates[(step, e.name)] = rel(layouts.full_of(e.param.detach()).double() - b, r.detach().double() - b)
            for k, v in opt.state[e.param].items():
                ours, theirs = layouts.full_of(v), ref.state[r][k]
                if k in ROUNDED_KEYS:
                    rounding[(step, e.name, k)] = rounding_error(ours, theirs)
                elif theirs.ndim:  # fp32 statistics (Muown): the sharding-invariance tolerance
                    updates[(step, f"{e.name}:{k}")] = rel(ours, theirs)
    dtypes = {e.name: {k: v.dtype for k, v in opt.state[e.param].items()} for e in entries}
    return updates, rounding, dtypes


@pytest.mark.parametrize("kind", ["fsdp", "ep"])
def test_bf16_state_equals_fp32_math_rounded_per_step(pool2, kind):
    updates, rounding, dtypes = pool2.run(_bf16_state_vs_fp32_math, kind)[0]
    for name, state in dtypes.items():
        for k, dtype in state.items():
            assert dtype == (BF16 if k in ROUNDED_KEYS else torch.float32), (name, k, dtype)
    assert any(k == "exp_avg" for (_, _, k) in rounding) and any(k == "momentum_buffer" for (_, _, k) in rounding)
    bad = {k: v for k, v in updates.items() if v > UPDATE_TOL}
    assert not bad, f"updates off the fp32-math step: {bad}"
    bad = {k: v for k, v in rounding.items() if v > 1.0}
    assert not bad, f"bf16 state more than one bf16 spacing from the fp32-math state: {bad}"
    # the state really is rounded (not kept in fp32 somewhere): some elements are off by ~half a spacing
    assert max(rounding.values()) > 0.1


# ----------------------------------------------------------------------------- DCP resume


def _segments(root: str, start: int, stop: int, load: bool, save: bool):
    """test_checkpoint's model (Muon, Muown, 3D experts, AdamW) under FSDP with bf16 state."""
    from test_checkpoint import apply_layout, make_model, make_optimizer, snapshot, train_steps

    from dist_muon import checkpoint as ck

    model = apply_layout(make_model(), "fsdp")
    opt, sched = make_optimizer(model, state_dtype=BF16)
    if load:
        assert ck.load_checkpoint(ck.latest_checkpoint(root), model, opt, lr_schedulers=[sched])["step"] == start
    train_steps(model, opt, sched, start, stop)
    if save:
        ck.save_checkpoint(root, stop, model, opt, lr_schedulers=[sched])
    dtypes = {(n, k): v.dtype for n, p in model.named_parameters() for k, v in opt.state[p].items()}
    return snapshot(model, opt), dtypes


def test_bf16_state_dcp_resume_is_bitwise(pool2, tmp_path):
    root = str(tmp_path / "bf16")
    uninterrupted, dtypes = pool2.run(_segments, root, 0, 6, False, False)[0]
    pool2.run(_segments, root, 0, 3, False, True)
    resumed, resumed_dtypes = pool2.run(_segments, root, 3, 6, True, False)[0]
    assert resumed_dtypes == dtypes and dtypes[("down.weight", "momentum_buffer")] == BF16
    assert dtypes[("embed.weight", "exp_avg_sq")] == BF16 and dtypes[("gate.weight", "magnitude")] == torch.float32
    assert set(resumed) == set(uninterrupted)
    differ = [k for k in uninterrupted if not torch.equal(resumed[k], uninterrupted[k])]
    assert not differ, f"the resumed bf16-state run differs from the uninterrupted one: {differ}"


def test_switching_state_dtype_at_resume_converts_the_state(tmp_path):
    """An fp32-state checkpoint (it has no state_dtype key) loads into bf16 state, rounded; that
    bf16 checkpoint loads back into fp32 state exactly."""
    from test_checkpoint import make_model, make_optimizer, train_steps

    from dist_muon import checkpoint as ck

    def load(path, state_dtype):
        model = make_model()
        opt, sched = make_optimizer(model, state_dtype=state_dtype)
        ck.load_checkpoint(path, model, opt, lr_schedulers=[sched])
        assert all(g.get("state_dtype") == state_dtype for g in opt.param_groups)
        return model, opt, sched

    def assert_state(want_opt, want_model, opt, model, dtype):
        for p, q in zip(want_model.parameters(), model.parameters()):
            assert torch.equal(p, q)
            for k, v in want_opt.state[p].items():
                live = opt.state[q][k]
                want = dtype if k in ROUNDED_KEYS else v.dtype
                assert live.dtype == want and torch.equal(live, v.to(want)), k

    model = make_model()
    opt, sched = make_optimizer(model)
    train_steps(model, opt, sched, 0, 2)
    fp32_path = ck.save_checkpoint(str(tmp_path / "fp32"), 2, model, opt, lr_schedulers=[sched])
    bf16_model, bf16_opt, bf16_sched = load(fp32_path, BF16)
    assert_state(opt, model, bf16_opt, bf16_model, BF16)
    bf16_path = ck.save_checkpoint(str(tmp_path / "bf16"), 2, bf16_model, bf16_opt, lr_schedulers=[bf16_sched])
    fp32_model, fp32_opt, _ = load(bf16_path, None)
    assert_state(bf16_opt, bf16_model, fp32_opt, fp32_model, torch.float32)


# ----------------------------------------------------------------------------- the graphed step, host ops


def _graph_model(seed=3):
    torch.manual_seed(seed)
    m = nn.Module()
    m.a, m.b, m.c, m.bias = (nn.Parameter(torch.randn(*s)) for s in ((12, 16), (4, 6, 8), (16, 12), (12,)))
    return m


def _graph_run(cuda_graph: bool, steps: int = 4):
    m = _graph_model()
    groups = [{"params": [m.a, m.b], "param_names": ["a", "b"], "algorithm": "muon"},
              {"params": [m.c], "param_names": ["c"], "algorithm": "normuon", "nesterov": False},
              {"params": [m.bias], "param_names": ["bias"], "algorithm": "adamw"}]
    opt = dm.DistMuon(groups, lr=0.05, weight_decay=0.1, ns_dtype=torch.float32, bucket_bytes=2048,
                      cuda_graph=cuda_graph, state_dtype=BF16)
    for step in range(steps):
        for name, p in m.named_parameters():
            p.grad = None if (name, step) == ("b", 2) else grad_for(name, p.shape, step)
        opt.step()
    return m, opt


def test_graphed_step_with_bf16_state_equals_the_eager_step():
    # lr and weight decay come from device memory in the graphed step, so fp32 rounding differs in
    # the last bits: updates to 1e-5, state to one bf16 spacing (a flipped rounding)
    graphed, opt_g = _graph_run(True)
    eager, opt_e = _graph_run(False)
    assert opt_g._graphed is not None
    for (name, p), q, p0 in zip(graphed.named_parameters(), eager.parameters(), _graph_model().parameters()):
        assert rel(p.detach() - p0.detach(), q.detach() - p0.detach()) <= UPDATE_TOL, name
        for k, v in opt_g.state[p].items():
            want = opt_e.state[q][k]
            assert v.dtype == want.dtype and (rounding_error(v, want) <= 1.0 if v.dtype == BF16
                                              else rel(v, want) <= UPDATE_TOL), (name, k)
    assert opt_g.state[graphed.a]["momentum_buffer"].dtype == BF16


def test_ops_per_step_with_bf16_state_do_not_grow_with_the_number_of_matrices():
    from test_host_work import tiny_params, warm_optimizer

    from benchmarks.measure import count_ops

    few, many = (count_ops(warm_optimizer(tiny_params(n), state_dtype=BF16).step).total for n in (64, 1024))
    assert many <= 1.5 * few, f"{few} ops for 64 matrices but {many} for 1024"


# ----------------------------------------------------------------------------- memory, from the allocator


def test_bf16_state_is_half_the_allocator_measured_state_memory():
    from benchmarks.measure import peak_transient_bytes, retained_and_peak_bytes

    budget = 1 << 18
    measured = {}
    for state_dtype in (None, BF16):
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(128, 128, generator=g)) for _ in range(4)]
        # an embedding whose fp32 moments (1 MiB) are 4 budgets: updated in slices, never copied whole
        params.append(nn.Parameter(torch.randn(1024, 128, generator=g)))
        groups = [{"params": params[:4], "algorithm": "muon"}, {"params": params[4:], "algorithm": "adamw"}]
        made = []
        retained, _ = retained_and_peak_bytes(
            lambda: made.append(dm.DistMuon(groups, lr=0.02, ns_dtype=torch.float32, bucket_bytes=budget,
                                            state_dtype=state_dtype)))
        opt = made[0]
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            if _ == 0:
                opt.step()
        measured[state_dtype] = (retained, peak_transient_bytes(opt.step))
    (fp32_state, fp32_peak), (bf16_state, bf16_peak) = measured[None], measured[BF16]
    assert fp32_state >= 4 * (4 * 128 * 128 + 2 * 1024 * 128), measured  # the state really was measured
    assert abs(bf16_state / fp32_state - 0.5) <= 0.05 * 0.5, measured
    # the fp32 working copies are transient and at most a bucket budget on top of the step's own peak
    assert bf16_peak <= fp32_peak + budget, measured


# ----------------------------------------------------------------------------- validation


def test_unknown_state_dtype_names_the_group_and_the_fix():
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"state_dtype.*'int8'.*'bfloat16'"):
        dm.DistMuon([w], lr=0.1, state_dtype="int8")
    with pytest.raises(ValueError, match=r"param group 0 \(w\): unknown state_dtype 'bf8'.*leave it unset"):
        dm.DistMuon([{"params": [w], "param_names": ["w"], "state_dtype": "bf8"}], lr=0.1)
    groups = dm.build_param_groups(nn.Linear(4, 4), rules=[("weight", {"state_dtype": torch.int32})])
    with pytest.raises(ValueError, match=r"\(weight\): unknown state_dtype torch.int32"):
        dm.DistMuon(groups, lr=0.1)

def test_state_dtype_per_group_and_default_keeps_the_group_unchanged():
    lin = nn.Linear(8, 8)
    groups = dm.build_param_groups(lin, rules=[(r"^bias$", {"state_dtype": "bf16"})])
    opt = dm.DistMuon(copy.copy(groups), lr=0.1)
    assert opt.state[lin.weight]["momentum_buffer"].dtype == torch.float32
    assert opt.state[lin.bias]["exp_avg"].dtype == BF16
    weight_group = next(g for g in opt.param_groups if g["params"][0] is lin.weight)
    assert "state_dtype" not in weight_group  # unset: old checkpoints (without the key) still load
