"""QK-clip on sharded weights: after a step, every layout's weights equal the single-process step on
full tensors followed by an fp64 reference of the clip rule, written here head by head on full
tensors (GQA with a query bias, a fused QKV interleaved per key head, a packed [Q; K; V] and MLA in
one optimizer), given the same maxima; each rank passes only some heads' maxima (the step reduces
them with MAX). The rule is also checked against explicit QKᵀ: after the clip each head's largest
logit on the same inputs is min(S_h, τ).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch
from torch import nn

import dist_muon as dm
from dist_muon import qk_clip as qk

TAU, ALPHA = 2.0, 0.5
TOL = 1e-5  # fp32 Newton–Schulz and fp32 factors against fp64
DIM = 8

# Geometries. GQA: 6 query heads of 3 rows in 2 groups (18 and 6 rows: FSDP over 4 ranks cuts
# heads, shards of 5, 5, 5, 3 and 2, 2, 2, 0). Interleaved: 3 KV groups of (1 q, k, v) × 3 rows,
# 27 rows (W=2 cuts at 14, inside K). TP-friendly interleaved: 2 groups of (2 q, k, v) × 2 rows.
# Packed [Q; K; V]: 4 heads of 2 over 2 keys. MLA: 3 heads, nope 2, rope 2, v 3.
GQA = dict(n_heads=6, n_kv=2, hd=3)
FUSED = dict(n_kv=3, hpk=1, hd=3)
FUSED_TP = dict(n_kv=2, hpk=2, hd=2)
PACKED = dict(n_heads=4, n_kv=2, hd=2)
MLA = dict(n_heads=3, nope=2, rope=2, v=3, rank=6)
SHAPES = {
    "gqa_q": (GQA["n_heads"] * GQA["hd"], DIM), "gqa_k": (GQA["n_kv"] * GQA["hd"], DIM),
    "gqa_v": (GQA["n_kv"] * GQA["hd"], DIM),
    "fused": (FUSED["n_kv"] * (FUSED["hpk"] + 2) * FUSED["hd"], DIM),
    "fused_tp": (FUSED_TP["n_kv"] * (FUSED_TP["hpk"] + 2) * FUSED_TP["hd"], DIM),
    "packed": ((PACKED["n_heads"] + 2 * PACKED["n_kv"]) * PACKED["hd"], DIM),
    "mla_q": (MLA["n_heads"] * (MLA["nope"] + MLA["rope"]), DIM),
    "mla_kv_b": (MLA["n_heads"] * (MLA["nope"] + MLA["v"]), MLA["rank"]),
}
N_HEADS = GQA["n_heads"] + FUSED["n_kv"] * FUSED["hpk"] + FUSED_TP["n_kv"] * FUSED_TP["hpk"] + PACKED["n_heads"] \
    + MLA["n_heads"]


def seeded(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def base_maxima() -> torch.Tensor:
    """Per head (in registration order): some above τ, some below, one exactly at τ (not clipped)."""
    values = torch.linspace(0.5, 9.0, N_HEADS)
    values = values[torch.randperm(N_HEADS, generator=torch.Generator().manual_seed(3))]
    values[1] = TAU
    return values


# --------------------------------------------------------------------------- the model and its heads


class Attention(nn.Module):
    """Every projection as an nn.Linear (so TP plans apply); ``gqa_q`` has a bias (AdamW-routed)
    whose rows scale with their head's query rows."""

    def __init__(self):
        super().__init__()
        for i, (name, (rows, cols)) in enumerate(SHAPES.items()):
            linear = nn.Linear(cols, rows, bias=name == "gqa_q")
            linear.weight.data.copy_(seeded((rows, cols), 10 + i))
            if linear.bias is not None:
                linear.bias.data.copy_(seeded((rows,), 50 + i))
            setattr(self, name, linear)


def heads_of(m: Attention) -> list[qk.AttentionHeads]:
    hd = GQA["hd"]
    # the bias: each query head's rows of weight and bias together
    gqa = qk.mha("gqa", m.gqa_q.weight, m.gqa_k.weight, head_dim=hd, n_kv_heads=GQA["n_kv"], q_bias=m.gqa_q.bias)
    return [
        gqa,
        qk.fused_qkv("fused", m.fused.weight, n_kv_heads=FUSED["n_kv"], heads_per_kv=FUSED["hpk"], head_dim=FUSED["hd"]),
        qk.fused_qkv("fused_tp", m.fused_tp.weight, n_kv_heads=FUSED_TP["n_kv"], heads_per_kv=FUSED_TP["hpk"],
                     head_dim=FUSED_TP["hd"]),
        qk.packed_qkv("packed", m.packed.weight, n_heads=PACKED["n_heads"], n_kv_heads=PACKED["n_kv"],
                      head_dim=PACKED["hd"]),
        qk.mla("mla", m.mla_q.weight, m.mla_kv_b.weight, n_heads=MLA["n_heads"], qk_nope_head_dim=MLA["nope"],
               qk_rope_head_dim=MLA["rope"], v_head_dim=MLA["v"]),
    ]


def groups_of(m: nn.Module) -> list[dict]:
    named = list(m.named_parameters())
    return [{"params": [p for _, p in named if p.ndim == 2], "param_names": [n for n, p in named if p.ndim == 2],
             "algorithm": "muon"},
            {"params": [p for _, p in named if p.ndim < 2], "param_names": [n for n, p in named if p.ndim < 2],
             "algorithm": "adamw"}]


OPT = dict(lr=0.05, weight_decay=0.1, adamw_lr=0.01, ns_dtype=torch.float32)


# --------------------------------------------------------------------------- the fp64 reference of the rule


def gamma_of(s: float) -> float:
    return TAU / s if s > TAU else 1.0


def _scale_groups(q_rows, k_rows, gammas, kv_of, alpha):
    """GQA rule, head by head: key g by (min γ of its group)^(1−α), query h by γ_h / that."""
    for g, k in enumerate(k_rows):
        group = [h for h in range(len(gammas)) if kv_of[h] == g]
        key = min(gammas[h] for h in group) ** (1 - alpha)
        k *= key
        for h in group:
            for rows in q_rows[h]:
                rows *= gammas[h] / key


def clip_reference(full: dict[str, torch.Tensor], maxima: torch.Tensor, alpha: float = ALPHA) -> dict:
    """The rule on full fp64 tensors; names as ``Attention.named_parameters``."""
    w = {k: v.double().clone() for k, v in full.items()}
    gammas = [gamma_of(float(s)) for s in maxima]
    h0 = 0

    def take(n):
        nonlocal h0
        out = gammas[h0:h0 + n]
        h0 += n
        return out

    hd, n_kv = GQA["hd"], GQA["n_kv"]
    q, b, k = w["gqa_q.weight"], w["gqa_q.bias"], w["gqa_k.weight"]
    g = take(GQA["n_heads"])
    per = GQA["n_heads"] // n_kv
    _scale_groups([[q[h * hd:(h + 1) * hd], b[h * hd:(h + 1) * hd]] for h in range(GQA["n_heads"])],
                  [k[j * hd:(j + 1) * hd] for j in range(n_kv)], g, [h // per for h in range(GQA["n_heads"])], alpha)
    for name, geo in (("fused", FUSED), ("fused_tp", FUSED_TP)):
        t = w[f"{name}.weight"].view(geo["n_kv"], geo["hpk"] + 2, geo["hd"], -1)  # (group, q.. k v, rows, cols)
        g = take(geo["n_kv"] * geo["hpk"])
        _scale_groups([[t[h // geo["hpk"], h % geo["hpk"]]] for h in range(len(g))],
                      [t[j, geo["hpk"]] for j in range(geo["n_kv"])], g, [h // geo["hpk"] for h in range(len(g))], alpha)
    t, hd, n_kv = w["packed.weight"], PACKED["hd"], PACKED["n_kv"]
    g = take(PACKED["n_heads"])
    qs = PACKED["n_heads"] * hd
    per = PACKED["n_heads"] // n_kv
    _scale_groups([[t[h * hd:(h + 1) * hd]] for h in range(PACKED["n_heads"])],
                  [t[qs + j * hd:qs + (j + 1) * hd] for j in range(n_kv)], g,
                  [h // per for h in range(PACKED["n_heads"])], alpha)
    g = take(MLA["n_heads"])
    wq = w["mla_q.weight"].view(MLA["n_heads"], MLA["nope"] + MLA["rope"], -1)
    wkv = w["mla_kv_b.weight"].view(MLA["n_heads"], MLA["nope"] + MLA["v"], -1)
    for h, gh in enumerate(g):  # q_C by γ^α, k_C by γ^(1−α), q_R by γ; v untouched
        wq[h, :MLA["nope"]] *= gh ** alpha
        wq[h, MLA["nope"]:] *= gh
        wkv[h, :MLA["nope"]] *= gh ** (1 - alpha)
    assert h0 == N_HEADS
    return w


# --------------------------------------------------------------------------- one layout, compared


def _rank_maxima(base: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Head h's maximum is seen on rank h % world; the others saw less (or nothing: -inf)."""
    owner = torch.arange(len(base)) % world
    lower = torch.where(torch.arange(len(base)) % 2 == 0, base - 1.0 - rank, torch.full_like(base, -math.inf))
    return torch.where(owner == rank, base, lower)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def _shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if not isinstance(p, DTensor):
        return full.clone()
    # Through Replicate: distribute_tensor refuses some uneven _StridedShard (FSDP over TP) splits.
    whole = distribute_tensor(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim)
    return whole.redistribute(p.device_mesh, p.placements)


def _apply_layout(m: Attention, layout: str) -> None:
    if layout == "plain":
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    world = torch.distributed.get_world_size()
    if layout == "fsdp":
        fully_shard(m, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",)))
    elif layout == "hsdp":
        fully_shard(m, mesh=init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp_replicate", "dp_shard")))
    elif layout in ("tp", "fsdp_tp"):  # ColwiseParallel: weight (and bias) Shard(0), whole heads per TP rank
        tp = world if layout == "tp" else 2
        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
        parallelize_module(m, mesh["tp"], {name: ColwiseParallel() for name in SHAPES})
        if layout == "fsdp_tp":
            fully_shard(m, mesh=mesh["dp"])
    else:
        raise ValueError(layout)


def clip_errors(layout: str, steps: int = 2, cuda_graph: bool = False) -> dict:
    """Run ``steps`` steps with QK-clip on ``layout``; the worst relative error of each parameter's
    change against the single-process step on full tensors followed by ``clip_reference``."""
    dist = torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    model, reference = Attention(), Attention()
    _apply_layout(model, layout)
    opt = dm.DistMuon(groups_of(model), **OPT, qk_clip_threshold=TAU, qk_clip_alpha=ALPHA,
                      qk_clip_heads=heads_of(model), cuda_graph=cuda_graph)
    ref = dm.DistMuon(groups_of(reference), **OPT)  # the step alone, on full tensors
    names = [n for n, _ in model.named_parameters()]
    errors, stats = {}, []
    for step in range(steps):
        base = base_maxima() * (1 + step)  # larger in step 2: heads clipped before are clipped again
        for i, ((n, p), r) in enumerate(zip(model.named_parameters(), reference.parameters())):
            g = seeded(p.shape, 1000 * (step + 1) + i)
            r.grad, p.grad = g.clone(), _shard_like(g, p)
        opt.qk_clip.max_logits.copy_(_rank_maxima(base, rank, world))
        before = {n: _full(p.detach()).double() for n, p in model.named_parameters()}
        opt.step()
        ref.step()
        expected = clip_reference(dict(zip(names, (r.detach() for r in reference.parameters()))), base)
        with torch.no_grad():
            for r, n in zip(reference.parameters(), names):
                r.copy_(expected[n])  # both sides continue from the clipped weights
        for n, p in model.named_parameters():
            got, want = _full(p.detach()).double() - before[n], expected[n] - before[n]
            errors[n] = max(errors.get(n, 0.0), float((got - want).norm() / want.norm()))
        stats.append((float(opt.last_step_stats.qk_max_logit), int(opt.last_step_stats.qk_heads_clipped),
                      float(base.max()), int((base > TAU).sum())))
        assert torch.isinf(opt.qk_clip.max_logits).all(), "the maxima buffer starts over after a step"
    return {"errors": errors, "stats": stats}


def _check(results: list[dict]) -> None:
    for result in results:
        bad = {n: e for n, e in result["errors"].items() if not e <= TOL}
        assert not bad, f"parameters differing from the fp64 reference of the clip: {bad}"
        for got_max, got_clipped, want_max, want_clipped in result["stats"]:
            assert got_max == pytest.approx(want_max) and got_clipped == want_clipped


# --------------------------------------------------------------------------- layouts


def test_one_process_equals_the_fp64_reference():
    _check([clip_errors("plain")])


def test_one_process_cuda_graph_step_clips_too():
    _check([clip_errors("plain", cuda_graph=True)])  # eager on CPU: the same prologue and body


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_cuda_clip_equals_the_cpu_clip_without_a_host_sync(cuda_graph):
    """On the device, eager or in the graphed step (captured in the first steps, the clip right after
    the replay): the same weights as on the CPU, and a warm step syncs the host no more than
    without QK-clip (the agreement vector's one read)."""
    from test_host_work import counted_host_syncs

    torch.backends.cuda.matmul.allow_tf32 = False
    models = {d: Attention().to(d) for d in ("cpu", "cuda")}
    opts = {d: dm.DistMuon(groups_of(m), **OPT, qk_clip_threshold=TAU, qk_clip_heads=heads_of(m),
                           cuda_graph=cuda_graph and d == "cuda") for d, m in models.items()}
    for step in range(4):
        for d, m in models.items():
            for i, p in enumerate(m.parameters()):
                p.grad = seeded(p.shape, 100 * step + i).to(d)
            opts[d].qk_clip.max_logits.copy_(base_maxima() * (1 + step))
        opts["cpu"].step()
        if step < 3:
            opts["cuda"].step()
            continue
        with counted_host_syncs() as syncs:
            opts["cuda"].step()
        assert len(syncs) <= 1, syncs
    if cuda_graph:
        assert opts["cuda"]._graphed.graph is not None, "the step was not captured"
    assert int(opts["cuda"].last_step_stats.qk_heads_clipped) == int((base_maxima() * 4 > TAU).sum())
    for (name, c), g in zip(models["cpu"].named_parameters(), models["cuda"].parameters()):
        torch.testing.assert_close(g.detach().cpu(), c.detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_two_ranks_equal_the_fp64_reference(pool2, layout):
    _check(pool2.run(clip_errors, layout))


@pytest.mark.parametrize("layout", ["fsdp", "hsdp", "fsdp_tp"])
def test_four_ranks_equal_the_fp64_reference(pool4, layout):
    _check(pool4.run(clip_errors, layout))


def _local_rows(layout: str) -> dict:
    """Which global rows of each weight this rank holds (so the test knows heads were cut)."""
    model = Attention()
    _apply_layout(model, layout)
    rows = {}
    for n, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        rows[n] = local.shape[0]
    return rows


def test_fsdp_over_four_ranks_cuts_heads(pool4):
    rows = pool4.run(_local_rows, "fsdp")
    assert [r["gqa_q.weight"] for r in rows] == [5, 5, 5, 3]  # heads of 3 rows cut at 5, 10, 15
    assert [r["gqa_k.weight"] for r in rows] == [2, 2, 2, 0]  # and an empty shard


# --------------------------------------------------------------------------- the rule, exactly


def _logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal q·k/√d of [heads, seq, d] queries against [heads, seq, d] keys: per head, the max."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    return s.masked_fill(~causal, -math.inf).amax(dim=(-1, -2))


def _gqa_maxima(wq, wk, x, n_kv, hd):
    q = (x @ wq.T).view(x.shape[0], -1, hd).transpose(0, 1)
    k = (x @ wk.T).view(x.shape[0], n_kv, hd).transpose(0, 1)
    return _logits(q, k.repeat_interleave(q.shape[0] // n_kv, dim=0))


def _mla_maxima(wq, wkv_b, wk_rope, x, c):
    H, nope, rope = MLA["n_heads"], MLA["nope"], MLA["rope"]
    q = (x @ wq.T).view(x.shape[0], H, nope + rope).transpose(0, 1)
    k_c = (c @ wkv_b.T).view(x.shape[0], H, nope + MLA["v"]).transpose(0, 1)[..., :nope]
    k_r = (x @ wk_rope.T).expand(H, -1, -1)  # one rotary key shared by every head
    return _logits(q, torch.cat([k_c, k_r], dim=-1))


@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0, 0.3])
def test_after_the_clip_every_head_max_logit_is_min_of_s_and_tau(alpha):
    """Explicit QKᵀ on the same inputs before and after: GQA groups mixing clipped and unclipped
    heads, and MLA with its shared rotary key."""
    x = seeded((12, DIM), 7) * 3
    c = seeded((12, MLA["rank"]), 8) * 3
    wq, wk = seeded(SHAPES["gqa_q"], 1).double(), seeded(SHAPES["gqa_k"], 2).double()
    mq, mkv, mkr = seeded(SHAPES["mla_q"], 3).double(), seeded(SHAPES["mla_kv_b"], 4).double(), \
        seeded((MLA["rope"], DIM), 5).double()
    x, c = x.double(), c.double()
    s_gqa = _gqa_maxima(wq, wk, x, GQA["n_kv"], GQA["hd"])
    s_mla = _mla_maxima(mq, mkv, mkr, x, c)
    tau = float(torch.cat([s_gqa, s_mla]).median())  # about half the heads clipped
    params = [nn.Parameter(t.float()) for t in (wq, wk, mq, mkv)]
    heads = [qk.mha("gqa", params[0], params[1], head_dim=GQA["hd"], n_kv_heads=GQA["n_kv"]),
             qk.mla("mla", params[2], params[3], n_heads=MLA["n_heads"], qk_nope_head_dim=MLA["nope"],
                    qk_rope_head_dim=MLA["rope"], v_head_dim=MLA["v"])]
    opt = dm.DistMuon([{"params": params, "algorithm": "muon"}], lr=0.0, qk_clip_threshold=tau,
                      qk_clip_alpha=alpha, qk_clip_heads=heads)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.qk_clip.max_logits.copy_(torch.cat([s_gqa, s_mla]).float())
    opt.step()
    after = [p.detach().double() for p in params]
    got = torch.cat([_gqa_maxima(after[0], after[1], x, GQA["n_kv"], GQA["hd"]),
                     _mla_maxima(after[2], after[3], mkr, x, c)])
    want = torch.cat([s_gqa, s_mla]).clamp(max=tau)
    assert 0 < int(opt.last_step_stats.qk_heads_clipped) < len(want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- off by default, settings


def _step_pair(threshold):
    """Weights after a step without QK-clip and with it (τ above every maximum: nothing clipped)."""
    out = []
    for kwargs in ({}, {"qk_clip_threshold": threshold, "qk_clip_heads": None}):
        m = Attention()
        if kwargs:
            kwargs["qk_clip_heads"] = heads_of(m)
        opt = dm.DistMuon(groups_of(m), **OPT, **kwargs)
        for i, p in enumerate(m.parameters()):
            p.grad = seeded(p.shape, 99 + i)
        if kwargs:
            opt.qk_clip.max_logits.copy_(base_maxima())
        opt.step()
        out.append((opt, [p.detach().clone() for p in m.parameters()]))
    return out


def test_off_by_default_and_a_threshold_above_every_maximum_changes_nothing():
    (plain, plain_weights), (clipped, clip_weights) = _step_pair(threshold=1e6)
    assert plain.qk_clip is None and plain.last_step_stats.qk_max_logit is None
    for a, b in zip(plain_weights, clip_weights):
        assert torch.equal(a, b)  # every factor is exactly 1
    assert int(clipped.last_step_stats.qk_heads_clipped) == 0


def test_no_maxima_recorded_means_no_clip():
    m = Attention()
    opt = dm.DistMuon(groups_of(m), lr=0.0, qk_clip_threshold=TAU, qk_clip_heads=heads_of(m))
    before = [p.detach().clone() for p in m.parameters()]
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, m.parameters()))
    assert int(opt.last_step_stats.qk_heads_clipped) == 0


def test_turned_off_after_construction_keeps_reporting_the_max_logit():
    m = Attention()
    opt = dm.DistMuon(groups_of(m), lr=0.0, qk_clip_threshold=TAU, qk_clip_heads=heads_of(m))
    before = [p.detach().clone() for p in m.parameters()]
    opt.qk_clip_threshold = None
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.qk_clip.max_logits.copy_(base_maxima())
    opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, m.parameters()))
    assert float(opt.last_step_stats.qk_max_logit) == pytest.approx(float(base_maxima().max()))


def test_record_keeps_the_running_max_from_a_first_head():
    m = Attention()
    opt = dm.DistMuon(groups_of(m), lr=0.0, qk_clip_threshold=TAU, qk_clip_heads=heads_of(m))
    opt.qk_clip.record("fused", torch.tensor([1.0, 5.0]), first_head=1)
    opt.qk_clip.record("fused", torch.tensor([3.0, 2.0]), first_head=1)
    s = opt.qk_clip.slice("fused")
    assert s == slice(GQA["n_heads"], GQA["n_heads"] + 3)
    assert opt.qk_clip.max_logits[s].tolist() == [-math.inf, 3.0, 5.0]
    with pytest.raises(ValueError, match="exceed"):
        opt.qk_clip.record("fused", torch.ones(3), first_head=1)
    with pytest.raises(KeyError, match="no attention named"):
        opt.qk_clip.slice("nope")


def _bad(match, m=None, **kwargs):
    m = m or Attention()
    options = dict(lr=0.02, qk_clip_threshold=TAU, qk_clip_heads=heads_of(m))
    options.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        dm.DistMuon(groups_of(m), **options)


def test_settings_are_validated_naming_the_option():
    _bad("qk_clip_threshold must be a positive number", qk_clip_threshold=0.0)
    _bad("qk_clip_threshold must be a positive number", qk_clip_threshold=float("inf"))
    _bad("qk_clip_alpha must be a number in", qk_clip_alpha=1.5)
    _bad("no attention heads are registered", qk_clip_heads=())
    _bad("qk_clip_threshold is None", qk_clip_threshold=None)
    stranger = nn.Parameter(torch.randn(18, DIM))
    _bad("not in this optimizer", qk_clip_heads=[qk.mha("x", stranger, stranger[:6], head_dim=3, n_kv_heads=2)])


def test_heads_are_validated_naming_the_attention():
    m = Attention()
    w = m.gqa_q.weight
    with pytest.raises(ValueError, match="not a whole number of heads"):
        qk.mha("a", w, m.gqa_k.weight, head_dim=4)
    with pytest.raises(ValueError, match="do not form groups"):
        qk.mha("a", w, m.gqa_k.weight, head_dim=3, n_kv_heads=4)
    with pytest.raises(ValueError, match="wkv_b has shape"):
        qk.mla("a", m.mla_q.weight, m.gqa_k.weight, n_heads=3, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=3)
    twice = qk.mha("a", w, w, head_dim=3, n_kv_heads=6)  # keys on the query rows
    _bad("overlap the rows of a q head 0", m, qk_clip_heads=[twice])
    outside = qk.AttentionHeads("b", ((qk.Rows(w, 16, 20),),), ((qk.Rows(w, 0, 3),),), (0,))
    _bad(r"rows \[16, 20\) are not inside dim 0 of gqa_q.weight", m, qk_clip_heads=[outside])
    _bad("two attentions are named 'gqa'", m, qk_clip_heads=heads_of(m)[:1] * 2)


def _disagreeing(change_after: bool):
    m = Attention()
    _apply_layout(m, "fsdp")
    rank = torch.distributed.get_rank()
    tau = TAU if change_after or rank == 0 else TAU * 2
    opt = dm.DistMuon(groups_of(m), **OPT, qk_clip_threshold=tau, qk_clip_heads=heads_of(m))
    if change_after and rank == 1:
        opt.qk_clip_threshold = TAU * 2
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()


@pytest.mark.parametrize("change_after", [False, True])
def test_ranks_with_different_thresholds_raise_on_every_rank(pool2, change_after):
    with pytest.raises(RuntimeError) as info:
        pool2.run(_disagreeing, change_after)
    assert all("RankDisagreement" in msg and "qk clip" in msg for msg in info.value.failures.values())


# --------------------------------------------------------------------------- max logits from torchtitan models

SEQ, BATCH = 12, 4


def _torchtitan_022() -> bool:
    from importlib.metadata import version

    return version("torchtitan").startswith("0.2.")


torchtitan_022 = pytest.mark.skipif(not _torchtitan_022(), reason="torchtitan 0.2.2 models (0.3.0: tests/torchtitan030)")


def tt_model(kind: str, biased: bool = False) -> nn.Module:
    """A small torchtitan 0.2.2 model, the same on every rank: llama3 with GQA (4 query heads over 2
    keys) or deepseek_v3 dense MLA (wq_a/wq_b, yarn softmax scale); q/k weights enlarged so the
    logits are O(1). ``biased``: those projections get biases of the size of their outputs."""
    torch.manual_seed(0)
    if kind == "llama3":
        from torchtitan.models.llama3.model.args import TransformerModelArgs
        from torchtitan.models.llama3.model.model import Transformer

        model = Transformer(TransformerModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                                                 max_seq_len=SEQ, rope_theta=10000))
        big = ("wq", "wk")
    else:
        from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
        from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model

        model = DeepSeekV3Model(DeepSeekV3ModelArgs(
            vocab_size=64, dim=32, inter_dim=64, n_layers=2, n_dense_layers=2, n_heads=4, q_lora_rank=8,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=SEQ,
            original_seq_len=SEQ // 2, rope_factor=4, mscale=0.7))
        big = ("wq_b", "wkv_a", "wkv_b")
    with torch.no_grad():
        model.init_weights()
        for layer in model.layers.values():
            for i, name in enumerate(big):
                linear = getattr(layer.attention, name)
                linear.weight.mul_(30)
                if biased and name != "wkv_a":  # wkv_a's output is normalised (kv_norm): no bias reaches k
                    with_bias = nn.Linear(linear.in_features, linear.out_features, bias=True)
                    with_bias.weight.copy_(linear.weight)
                    with_bias.bias.copy_(seeded((linear.out_features,), 70 + i) * 3)
                    setattr(layer.attention, name, with_bias)
    return model


def tt_tokens() -> torch.Tensor:
    return torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def explicit_maxima(kind: str, weights: Optional[dict] = None, biased: bool = False) -> torch.Tensor:
    """Per layer and head, max of the causal q·kᵀ·scale computed whole from the q and k attention
    receives (captured on one process, full batch), with ``weights`` if given."""
    model = tt_model(kind, biased)
    if weights is not None:
        model.load_state_dict(weights)
    seen = []
    for layer in model.layers.values():
        layer.attention.inner_attention.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args[0], args[1], kwargs.get("scale"))), with_kwargs=True)
    with torch.no_grad():
        model(tt_tokens())
    out = []
    for q, k, scale in seen:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).double()
        s = q.double() @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        s = s.masked_fill(~torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), -math.inf)
        out.append(s.amax(dim=(0, 2, 3)))
    return torch.cat(out).float()


def hook_maxima(kind: str, layout: str, tau: float) -> tuple[list[float], list[float]]:
    """The hooks' maxima after a step (reduced over the ranks) on ``layout`` (FSDP ranks see
    different halves of the batch, TP ranks different heads), and after a second step on the same
    batch: the first step (lr 0) clipped the sharded weights at ``tau``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_muon.integrations.torchtitan import qk_logits

    model = tt_model(kind)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    tokens = tt_tokens()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        tokens = tokens.chunk(world)[rank]
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        if kind == "llama3":
            from torchtitan.models.llama3.infra.parallelize import apply_tp

            apply_tp(model, mesh, loss_parallel=False, enable_float8_tensorwise_tp=False)
        else:
            from torchtitan.models.deepseek_v3.infra.parallelize import apply_non_moe_tp

            apply_non_moe_tp(model, mesh, False, False, False)
    found = qk_logits.attentions(model)
    assert [a.name for a in found] == ["layers.0.attention", "layers.1.attention"]
    opt = dm.DistMuon(dm.build_param_groups(model), lr=0.0, qk_clip_threshold=tau,
                      qk_clip_heads=[a.heads for a in found])
    qk_logits.install(found, opt, qk_logits.BNLH, chunk=5)  # 12 keys: chunks of 5, 5, 2
    maxima = []
    for step in range(2):
        out = model(tokens)
        (out.float() ** 2).mean().backward()
        opt.step()
        maxima.append(opt.qk_clip.last_maxima.tolist())
        if step == 0:  # the weights of the second forward
            clipped = {n: _full(p.detach()) for n, p in model.named_parameters()}
    with torch.no_grad():  # evaluation forwards record nothing
        model(tokens)
    assert torch.isinf(opt.qk_clip.max_logits).all()
    return maxima, clipped


@torchtitan_022
@pytest.mark.parametrize("kind", ["llama3", "deepseek_v3"])
@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_hook_maxima_equal_explicit_qk_and_the_clip_bounds_the_next_forward(pool2, kind, layout):
    """The maxima equal explicit QKᵀ, before and after a clip of the sharded weights (lr 0: the clip
    alone changes them). On the same batch, the first layer's heads then peak at min(S_h, τ)
    exactly (≤ τ·(1 + 1e-3)); later layers' inputs moved with the clip of the layers below (MLA's
    second layer here: 0.2 % above τ), so their maxima are compared with explicit QKᵀ only."""
    want = explicit_maxima(kind)
    tau = float(want.median())
    heads = len(want) // 2
    for (first, second), weights in pool2.run(hook_maxima, kind, layout, tau):
        torch.testing.assert_close(torch.tensor(first), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(second), explicit_maxima(kind, weights), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(second[:heads]), want[:heads].clamp(max=tau), rtol=1e-5, atol=1e-6)
        assert max(second[:heads]) <= tau * (1 + 1e-3) < max(first[:heads])


def _attention_output_stand_in(q, k, v, **kwargs):
    """The attention's output shape from its values: torch's context-parallel SDPA (ring attention)
    dispatches only the CUDA kernels (CPU: "_scaled_dot_product_flash_attention_for_cpu does not
    have a sharding strategy"), so the CP test below stands in for the output alone. The hooks run
    before it, on the q and k CP gives the attention."""
    v = v.to_local() if hasattr(v, "to_local") else v
    return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


def cp_hook_maxima(kind: str, load_balancer: Optional[str], tau: float) -> tuple[list, list, str]:
    """The reduced maxima of two steps (lr 0) under torchtitan 0.2.2's context parallelism over all
    ranks: its CP plan on every attention, its input sharding (``load_balancer``: head-tail or
    contiguous) with the token positions, FSDP over the CP ranks (as torchtitan shards over
    dp_shard_cp), the hooks installed as the builder does; and the error of a CP forward without
    positions."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.experimental._attention import _disable_context_parallel_dispatcher
    from torchtitan.distributed.context_parallel import apply_cp_to_attention_module, prepare_context_parallel_input

    from benchmarks.measure import OpCounter
    from dist_muon.integrations.torchtitan import qk_logits

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("cp",))
    model = tt_model(kind)
    inners = [layer.attention.inner_attention for layer in model.layers.values()]
    apply_cp_to_attention_module(inners, mesh, "sdpa")
    try:
        for inner in inners:
            inner.forward = _attention_output_stand_in
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        found = qk_logits.attentions(model)
        opt = dm.DistMuon(dm.build_param_groups(model), lr=0.0, qk_clip_threshold=tau,
                          qk_clip_heads=[a.heads for a in found])
        qk_logits.install(found, opt, qk_logits.BNLH, chunk=5, part=model)
        maxima, orders = [], []
        for _ in range(2):
            tokens = tt_tokens()
            inputs, _, kwargs = prepare_context_parallel_input(tokens, tokens.clone(), {}, mesh, torch.device("cpu"),
                                                               load_balancer)
            orders.append(kwargs["positions"][0].tolist())
            with OpCounter() as ops:
                out = model(inputs, **kwargs)
            gathers = ops.ops["all_gather_into_tensor"]  # functional collectives (FSDP's own gathers are c10d ops)
            assert gathers == len(inners) + 1, ops.ops  # each layer's keys; the positions once per forward
            (out.float() ** 2).mean().backward()
            opt.step()
            maxima.append(opt.qk_clip.last_maxima.tolist())
        with pytest.raises(ValueError) as raised:
            model(inputs)
        return maxima, orders, str(raised.value)
    finally:
        _disable_context_parallel_dispatcher()


@torchtitan_022
@pytest.mark.parametrize("kind", ["llama3", "deepseek_v3"])
@pytest.mark.parametrize("load_balancer", ["headtail", None])
def test_hook_maxima_under_context_parallelism_equal_explicit_qk_of_the_whole_sequence(pool2, kind, load_balancer):
    """Each CP rank holds a load-balanced part of every sequence: the hook gathers the keys over
    the CP ranks and masks by the tokens' global positions, the step's all-reduce combines the
    ranks' queries. The first layer's q and k depend on the tokens and positions alone, so its
    maxima equal explicit QKᵀ of the whole sequence on one process, and after the clip (lr 0)
    they are min(S_h, τ). (Later layers' inputs come through the stand-in attention output.)"""
    want = explicit_maxima(kind)
    heads = len(want) // 2
    tau = float(want[:heads].median())
    results = pool2.run(cp_hook_maxima, kind, load_balancer, tau)
    half = SEQ // 2
    expected_orders = ([[0, 1, 2, 9, 10, 11], [3, 4, 5, 6, 7, 8]] if load_balancer
                       else [list(range(half)), list(range(half, SEQ))])
    assert [orders[0] for _, orders, _ in results] == expected_orders  # the shards are what the test says
    for (first, second), _, error in results:
        torch.testing.assert_close(torch.tensor(first[:heads]), want[:heads], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(second[:heads]), want[:heads].clamp(max=tau), rtol=1e-5, atol=1e-6)
        assert max(second[:heads]) <= tau * (1 + 1e-3) < max(first[:heads])
        assert "positions" in error and "part=model" in error


def flex_cp_error() -> str:
    """A llama3 flex-attention model under torchtitan 0.2.2's flex CP plan (which gathers the keys
    before the hook and shards the mask's queries): the error of its first training forward. Its
    masks need 2 × 128-token blocks per sequence, hence 256 tokens."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.attention.flex_attention import create_block_mask
    from torchtitan.distributed.context_parallel import apply_cp_to_attention_module, prepare_context_parallel_input
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import Transformer

    from dist_muon.integrations.torchtitan import qk_logits

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("cp",))
    torch.manual_seed(0)
    model = Transformer(TransformerModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64,
                                             max_seq_len=256, rope_theta=10000, attn_type="flex"))
    with torch.no_grad():
        model.init_weights()
    apply_cp_to_attention_module([layer.attention.inner_attention for layer in model.layers.values()], mesh, "flex")
    found = qk_logits.attentions(model)
    opt = dm.DistMuon(dm.build_param_groups(model), lr=0.0, qk_clip_threshold=1.0,
                      qk_clip_heads=[a.heads for a in found])
    qk_logits.install(found, opt, qk_logits.BNLH, part=model)
    tokens = torch.randint(0, 64, (2, 256), generator=torch.Generator().manual_seed(5))
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, 256, 256, device="cpu")
    inputs, _, kwargs = prepare_context_parallel_input(tokens, tokens.clone(), {"attention_masks": mask}, mesh,
                                                       torch.device("cpu"), "headtail")
    with pytest.raises(ValueError) as raised:
        model(inputs, **kwargs)
    return str(raised.value)


@torchtitan_022
def test_context_parallelism_with_flex_attention_is_refused_at_the_first_forward(pool2):
    for error in pool2.run(flex_cp_error):
        assert "context parallelism and flex attention" in error and 'attn_type "sdpa"' in error, error


@torchtitan_022
@pytest.mark.parametrize("kind", ["llama3", "deepseek_v3"])
def test_the_clip_scales_q_and_k_biases_with_their_weights(kind):
    """Projections with biases (W x + b): the builder registers each head's bias rows with its
    weight rows, so the clip scales the logits themselves: the next forward on the same batch has
    the first layer's heads at min(S_h, τ) (one process; the bias rows shard like any row)."""
    from dist_muon.integrations.torchtitan import qk_logits

    want = explicit_maxima(kind, biased=True)
    assert not torch.allclose(want, explicit_maxima(kind))  # the biases move the logits
    tau, heads = float(want.median()), len(want) // 2
    model = tt_model(kind, biased=True)
    found = qk_logits.attentions(model)
    biases = {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    assert all(any(id(r.param) in biases for r in head) for a in found for head in a.heads.q + a.heads.k)
    opt = dm.DistMuon(dm.build_param_groups(model), lr=0.0, qk_clip_threshold=tau,
                      qk_clip_heads=[a.heads for a in found])
    qk_logits.install(found, opt, qk_logits.BNLH)
    (model(tt_tokens()).float() ** 2).mean().backward()
    opt.step()
    torch.testing.assert_close(opt.qk_clip.last_maxima, want, rtol=1e-5, atol=1e-5)
    after = explicit_maxima(kind, {n: p.detach() for n, p in model.named_parameters()}, biased=True)
    torch.testing.assert_close(after[:heads], want[:heads].clamp(max=tau), rtol=1e-5, atol=1e-5)


def test_chunked_max_logits_equal_the_whole_computation_with_masks():
    from dist_muon.integrations.torchtitan.qk_logits import max_logits

    q, k = seeded((2, 6, 9, 4), 1), seeded((2, 3, 9, 4), 2)
    whole = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1]])

    def document(b, h, q_idx, kv_idx):
        return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

    same_doc = (docs[:, :, None] == docs[:, None, :]) & causal
    for chunk in (1, 4, 9, 20):
        got = max_logits(q, k, 0.3, chunk=chunk)
        torch.testing.assert_close(got, whole.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3)))
        got = max_logits(q, k, 0.3, mask_mod=document, chunk=chunk)
        torch.testing.assert_close(got, whole.masked_fill(~same_doc[:, None], -math.inf).amax(dim=(0, 2, 3)))
        torch.testing.assert_close(max_logits(q, k, 0.3, causal=False, chunk=chunk), whole.amax(dim=(0, 2, 3)))


def _train_maxima(wrap, steps: int = 3, count: bool = False) -> tuple[list, Optional[int]]:
    """Per step, the maxima a llama3 model's hooks recorded (lr 0.02, τ clipping some heads), with
    each block replaced by ``wrap(block)``; and (``count``, eager only) how many max-logit
    computations ran."""
    import contextlib
    from unittest import mock

    from dist_muon.integrations.torchtitan import qk_logits

    model = tt_model("llama3")
    found = qk_logits.attentions(model)
    opt = dm.DistMuon(dm.build_param_groups(model), lr=0.02, ns_dtype=torch.float32, qk_clip_threshold=35.0,
                      qk_clip_heads=[a.heads for a in found])
    qk_logits.install(found, opt, qk_logits.BNLH, chunk=5)
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, wrap(block))
    maxima = []
    counted = mock.patch.object(qk_logits, "max_logits", wraps=qk_logits.max_logits) if count else None
    with counted or contextlib.nullcontext() as calls:
        for _ in range(steps):
            (model(tt_tokens()).float() ** 2).mean().backward()
            maxima.append(opt.qk_clip.max_logits.clone())
            opt.step()
            opt.zero_grad()
    assert int(opt.last_step_stats.qk_heads_clipped) > 0
    return maxima, calls.call_count if count else None


@torchtitan_022
def test_the_hook_records_once_under_activation_checkpointing_and_inside_compiled_blocks():
    """torchtitan wraps blocks for activation checkpointing, then compiles each with fullgraph=True:
    the recompute in backward adds no max-logit work (eager), and the hook traces into the compiled
    block's graph (dynamo, aot_eager backend), recording the eager maxima step after step."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def compiled(block):
        return torch.compile(block, backend="aot_eager", fullgraph=True)

    eager, calls = _train_maxima(lambda block: block, count=True)
    assert calls == 3 * 2  # steps x layers
    checkpointed, calls = _train_maxima(checkpoint_wrapper, count=True)
    assert calls == 3 * 2
    for wrap in (compiled, lambda block: compiled(checkpoint_wrapper(block))):
        torch._dynamo.reset()
        got, _ = _train_maxima(wrap)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(checkpointed, eager):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- the torchtitan 0.2.2 optimizer builder


def _build_022(model, **fields):
    from types import SimpleNamespace

    from dist_muon.integrations import torchtitan as dm_titan
    from torchtitan.protocols.train_spec import get_train_spec

    dm_titan.register("llama3")
    cfg = dm_titan.DistMuonOptimizer(name="DistMuon", lr=0.02, adamw_lr=0.004, log_routing=False, **fields)
    dims = SimpleNamespace(get_optional_mesh=lambda name: None, ep_enabled=False, pp_enabled=False,
                           cp_enabled=False, dp_replicate_enabled=False, fsdp_enabled=False)
    return get_train_spec("llama3").build_optimizers_fn([model], cfg, dims)


def _pre_hooks(model) -> int:
    return sum(len(layer.attention.inner_attention._forward_pre_hooks) for layer in model.layers.values())


@torchtitan_022
def test_the_builder_registers_every_head_installs_the_hooks_and_logs_the_clip():
    from dist_muon.integrations.torchtitan.reporting import qk_clip_summary

    model = tt_model("llama3")
    (opt,) = _build_022(model, qk_clip_threshold=5.0, qk_clip_chunk=4)
    assert opt.qk_clip.n_heads == 2 * 4 and _pre_hooks(model) == 2
    want = explicit_maxima("llama3")
    (model(tt_tokens()).float() ** 2).mean().backward()
    opt.step()
    torch.testing.assert_close(opt.qk_clip.last_maxima, want, rtol=1e-5, atol=1e-6)
    line = qk_clip_summary([opt], None, enabled=True)
    assert line == f"QK-clip: max logit {float(want.max()):.6g}, heads clipped {int((want > 5.0).sum())}"


@torchtitan_022
def test_off_by_default_in_torchtitan_no_hook_and_no_log_line():
    from dist_muon.integrations.torchtitan.reporting import qk_clip_summary

    model = tt_model("llama3")
    (opt,) = _build_022(model)
    assert opt.qk_clip is None and _pre_hooks(model) == 0
    assert qk_clip_summary([opt], None, enabled=False) == ""


@torchtitan_022
def test_qk_norm_models_and_unsupported_parallelism_are_refused():
    from types import SimpleNamespace

    from dist_muon.integrations.torchtitan import ConfigError, DistMuonOptimizer
    from dist_muon.integrations.torchtitan.options import check_qk_clip_parallelism
    from dist_muon.integrations.torchtitan.qk_logits import attentions
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs
    from torchtitan.models.qwen3.model.model import Qwen3Model

    qwen = Qwen3Model(Qwen3ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=64,
                                     max_seq_len=SEQ))
    with pytest.raises(ValueError, match="QK-norm"):
        attentions(qwen)
    cfg = DistMuonOptimizer(name="DistMuon", qk_clip_threshold=10.0)
    dims = dict(cp_enabled=False, pp_enabled=False, dp_replicate_enabled=False, fsdp_enabled=True)

    def check(config=cfg, context_parallel=True, **changed):
        check_qk_clip_parallelism(config, SimpleNamespace(**{**dims, **changed}), context_parallel=context_parallel)

    check(dp_replicate_enabled=True)  # HSDP
    check(cp_enabled=True)  # 0.2.2
    check(pp_enabled=True)
    with pytest.raises(ConfigError, match="0.2.2 only"):
        check(cp_enabled=True, context_parallel=False)  # 0.3.0
    with pytest.raises(ConfigError, match="context and pipeline parallelism"):
        check(cp_enabled=True, pp_enabled=True)
    with pytest.raises(ConfigError, match="pure DDP"):
        check(dp_replicate_enabled=True, fsdp_enabled=False)
    check(DistMuonOptimizer(name="DistMuon"), cp_enabled=True, pp_enabled=True, context_parallel=False)  # off


# --------------------------------------------------------------------------- training (torchrun, 2 CPU ranks)

@pytest.mark.slow
@torchtitan_022
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo end-to-end test")
def test_training_the_debug_model_with_qk_clip_bounds_the_max_logit(launcher, tmp_path):
    """llama3 debugmodel, FSDP 2 on 2 CPU ranks, benchmarks/qk_clip.py's ``low_lr`` regime for 32
    steps: one fixed batch and a Muon lr at which every head's logit grows, by less than 1e-3 per
    step. Without clipping (the hook records, τ = 1e9 clips nothing) the max logit grows past τ;
    with τ the runs are identical up to the first clip, and from then on every step's forward (the
    weights the previous update and clip left) has its max logit within τ (1 + 1e-3), also when a
    faster head, unclipped so far, crosses τ; the loss is no worse. (With a per-step change above
    1e-3 the overshoot is about that change: docs/qk_clip.md's lr 0.1 curves.)"""
    from benchmarks.qk_clip import REGIMES, first_clip, largest_step_change, parse, repeated_document, train_args
    from harness import collective_timeout_args

    regime = dataclasses.replace(REGIMES["low_lr"], steps=32)
    tau, steps = regime.tau, regime.steps
    data = repeated_document(tmp_path)
    jobs = {name: launcher.start_ranks(2, [*train_args(str(tmp_path / name), regime, clip, data),
                                           *collective_timeout_args()], tmp_path / f"{name}.log", name=name)
            for name, clip in (("clipped", True), ("unclipped", False))}
    runs = {}
    for name, job in jobs.items():
        rc, log = job.wait()
        assert rc == 0, f"{name} failed (rc={rc}):\n{log[-6000:]}"
        runs[name] = parse(log)
        assert sorted(runs[name]["max_logit"]) == sorted(runs[name]["loss"]) == list(range(1, steps + 1)), runs[name]
    clipped, unclipped = runs["clipped"], runs["unclipped"]
    # the regime: without clipping the max logit grows past τ, by less than 1e-3 per step
    assert not any(unclipped["heads_clipped"].values())
    assert unclipped["max_logit"][steps] > tau * 1.002, unclipped["max_logit"]
    assert largest_step_change(unclipped) < 1e-3, unclipped["max_logit"]
    first = first_clip(clipped)
    assert first is not None and first <= steps // 2, clipped
    for s in range(1, first + 1):  # nothing differs before the first clip (every factor is exactly 1)
        assert clipped["loss"][s] == unclipped["loss"][s] and clipped["max_logit"][s] == unclipped["max_logit"][s]
        assert (clipped["max_logit"][s] > tau) == (s == first)
    after = {s: clipped["max_logit"][s] for s in range(first + 1, steps + 1)}
    assert max(after.values()) <= tau * (1 + 1e-3), after
    mean = {n: sum(r["loss"].values()) / steps for n, r in runs.items()}
    assert mean["clipped"] <= mean["unclipped"] * (1 + 1e-4), mean


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_clips_its_own_weights_like_the_original(how):
    import copy
    import pickle

    m = Attention()
    opt = dm.DistMuon(groups_of(m), **OPT, qk_clip_threshold=TAU, qk_clip_heads=heads_of(m))
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert twin.qk_clip is not opt.qk_clip and twin.qk_clip_threshold == TAU
    updates = []
    for o in (opt, twin):
        params = [p for g in o.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        for i, p in enumerate(params):
            p.grad = seeded(p.shape, 99 + i)
        o.qk_clip.max_logits.copy_(base_maxima())
        o.step()
        updates.append([p.detach() - b for p, b in zip(params, before)])
        assert int(o.last_step_stats.qk_heads_clipped) > 0
    assert all(torch.equal(a, b) for a, b in zip(*updates))
