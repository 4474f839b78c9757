"""``block_algorithms``: one fused weight whose row blocks are Muon matrices and AdamW rows.

Every run is compared with a single-process reference computed here, from the full tensors:
separate Muon matrices (``tests/reference.py``'s fp64 rule, each block orthogonalized whole with
its own lr scale) and ``torch.optim.AdamW`` on exactly the other rows (with the group's AdamW
hyperparameters and the same LR schedule). Layouts: one process, FSDP on 4 ranks with uneven
shards cutting through blocks (and empty shards), FSDP × TP 2 (ColwiseParallel: TP and FSDP both
cut blocks), and a DCP checkpoint of the 4-rank run resumed on one process.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dist_muon as dm
import layouts
from reference import muon_step64

LR, WD, MU = 0.05, 0.1, 0.95
ADAMW_LR, ADAMW_WD = 0.01, 0.02  # the optimizer's adamw_* (blocks without their own)
GDN_ADAMW = {"adamw_lr": 0.003, "adamw_betas": (0.8, 0.99)}  # in_proj's own AdamW-block settings
TOL = 1e-5  # fp32 Newton–Schulz against fp64
STEPS = 4


def lr_factor(step: int) -> float:
    """The LambdaLR schedule both sides follow (the AdamW blocks' lr follows it too)."""
    return 1.0 / (1.0 + 0.5 * step)


@dataclass(frozen=True)
class Fused:
    """A fused weight: ``shape`` [rows, cols] or [experts, rows, cols], its blocks and their algorithms."""

    shape: tuple[int, ...]
    sizes: tuple[int, ...]
    algos: tuple[str, ...]
    interleave: int = 1
    extra: tuple = ()  # more group options, as (key, value) pairs

    @property
    def options(self) -> dict:
        out = {"split_sizes": self.sizes, "block_algorithms": self.algos, **dict(self.extra)}
        if self.interleave > 1:
            out["interleave"] = self.interleave
        return out

    def block_rows(self, j: int) -> list[int]:
        """Rows of block j (along the row dim), in stacking order: block j of every repeat."""
        period, start = sum(self.sizes), sum(self.sizes[:j])
        return [r * period + start + t for r in range(self.interleave) for t in range(self.sizes[j])]

    def leads(self) -> list[tuple]:
        return [()] if len(self.shape) == 2 else [(e,) for e in range(self.shape[0])]

    def muon_matrices(self, t: torch.Tensor):
        """(index, matrix) of every Muon block (per expert for a 3D weight)."""
        for lead in self.leads():
            for j, algo in enumerate(self.algos):
                if algo == "muon":
                    index = (*lead, torch.tensor(self.block_rows(j)))
                    yield index, t[index]

    def adamw_mask(self) -> torch.Tensor:
        rows = sorted(r for j, a in enumerate(self.algos) if a == "adamw" for r in self.block_rows(j))
        mask = torch.zeros(self.shape, dtype=torch.bool)
        mask[(slice(None),) * (len(self.shape) - 2) + (torch.tensor(rows),)] = True
        return mask


# q, k, v, conv, gate, beta rows of a GatedDeltaNet in_proj: 27 rows, cut at 7/14/21 by FSDP over 4
# ranks (inside k, v and conv) and at 14 by TP 2 (inside v; FSDP then strides each TP half).
GDN = Fused((27, 8), (6, 6, 6, 4, 3, 2), ("muon",) * 3 + ("adamw",) * 3, extra=tuple(GDN_ADAMW.items()))
# an interleaved fused weight: 3 repeats of (muon 2, muon 2, adamw 1) rows
INTERLEAVED = Fused((15, 8), (2, 2, 1), ("muon", "muon", "adamw"), interleave=3)
# 3D experts with blocks inside each expert (FSDP gives two of the four ranks no expert at all)
EXPERTS = Fused((2, 9, 6), (3, 4, 2), ("adamw", "muon", "muon"))
FUSED = {"in_proj": GDN, "inter": INTERLEAVED, "experts": EXPERTS}
PLAIN = {"dense": (10, 8), "bias": (8,)}  # ordinary neighbours in the same optimizer


def full_init() -> dict[str, torch.Tensor]:
    shapes = {**{n: f.shape for n, f in FUSED.items()}, **PLAIN}
    return {n: layouts.seeded(s, 40 + i) * 0.5 for i, (n, s) in enumerate(shapes.items())}


def grad(name: str, shape, step: int) -> torch.Tensor:
    return layouts.seeded(shape, 1000 * (step + 1) + sum(map(ord, name)))


def groups_of(params: dict[str, torch.Tensor]) -> list[dict]:
    groups = [{"params": [params[n]], "param_names": [n], "algorithm": "muon", **f.options} for n, f in FUSED.items()
              if n in params]
    groups.append({"params": [params["dense"]], "param_names": ["dense"], "algorithm": "muon"})
    groups.append({"params": [params["bias"]], "param_names": ["bias"], "algorithm": "adamw"})
    return groups


def make_optimizer(params: dict[str, torch.Tensor], **kwargs):
    opt = dm.DistMuon(groups_of(params), lr=LR, momentum=MU, weight_decay=WD, adamw_lr=ADAMW_LR,
                      adamw_weight_decay=ADAMW_WD, ns_dtype=torch.float32, bucket_bytes=1024, **kwargs)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def train(params: dict[str, torch.Tensor], opt, sched, start: int, stop: int) -> list[dict]:
    """Steps [start, stop); returns the full parameters after each."""
    history = []
    for step in range(start, stop):
        for n, p in params.items():
            p.grad = shard_like(grad(n, p.shape, step), p)
        opt.step()
        sched.step()
        history.append({n: layouts.full_of(p.detach()).clone() for n, p in params.items()})
    return history


def shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``p``, by torch's own redistribution (``distribute_tensor`` refuses
    uneven _StridedShard layouts, FSDP over TP with 27 rows)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if not isinstance(p, DTensor):
        return full.clone()
    whole = distribute_tensor(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim)
    return whole.redistribute(p.device_mesh, p.placements)


def full_state(opt, params) -> dict:
    return {(n, k): layouts.full_of(v).clone() for n, p in params.items() for k, v in opt.state[p].items()}


# ----------------------------------------------------------------------------- the reference


def reference(steps: int) -> tuple[list[dict], dict]:
    """Separate Muon matrices (fp64) and torch.optim.AdamW on the AdamW rows, on full tensors."""
    fulls = full_init()
    history, state = [], {}
    adamw = {}
    for n, f in FUSED.items():
        mask = f.adamw_mask()
        q = nn.Parameter(fulls[n][mask].clone())
        hyper = {"lr": dict(f.extra).get("adamw_lr", ADAMW_LR), "betas": dict(f.extra).get("adamw_betas", (0.9, 0.95))}
        torch_opt = torch.optim.AdamW([q], eps=1e-8, weight_decay=ADAMW_WD, **hyper)
        adamw[n] = (mask, q, torch_opt, torch.optim.lr_scheduler.LambdaLR(torch_opt, lr_factor))
    bias = nn.Parameter(fulls["bias"].clone())
    bias_opt = torch.optim.AdamW([bias], lr=ADAMW_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=ADAMW_WD)
    bias_sched = torch.optim.lr_scheduler.LambdaLR(bias_opt, lr_factor)
    p64 = {n: fulls[n].double() for n in [*FUSED, "dense"]}
    bufs = {n: torch.zeros_like(p) for n, p in p64.items()}
    for step in range(steps):
        lr = LR * lr_factor(step)
        for n, p in p64.items():
            g = grad(n, p.shape, step)
            f = FUSED.get(n)
            matrices = f.muon_matrices if f else (lambda t: [(slice(None), t)])
            p_new, buf = muon_step64(p, g, bufs[n], lr=lr, momentum=MU, nesterov=True, weight_decay=WD,
                                     method="polar_express", adjust_lr="original", matrices=matrices)
            if f:
                mask, q, torch_opt, sched = adamw[n]
                q.grad = g[mask].clone()
                torch_opt.step()
                sched.step()
                p_new = p_new.clone()
                p_new[mask] = q.detach().double()
                buf = torch.where(mask, 0.0, buf)  # the momentum of AdamW rows stays zero
            p64[n], bufs[n] = p_new, buf
        bias.grad = grad("bias", bias.shape, step)
        bias_opt.step()
        bias_sched.step()
        history.append({**{n: p.clone() for n, p in p64.items()}, "bias": bias.detach().clone()})
    for n, (mask, q, torch_opt, _) in adamw.items():
        st = torch_opt.state[q]
        for k in ("exp_avg", "exp_avg_sq"):
            full = torch.zeros(FUSED[n].shape)
            full[mask] = st[k]
            state[(n, k)] = full
        state[(n, "step")] = st["step"]
    state.update({(n, "momentum_buffer"): b for n, b in bufs.items()})
    return history, state


@pytest.fixture(scope="module")
def ref():
    return reference(STEPS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_matches(history: list[dict], state: dict, ref, first_step: int = 0, start=None) -> None:
    """Every step's update of every parameter, and the final state, against the reference (``start``:
    the parameters a resumed run started from)."""
    ref_history, ref_state = ref
    ref_before = [full_init()] + ref_history
    ours_before = [start or ref_before[first_step]] + history
    bad = {}
    for i, got in enumerate(history):
        s = first_step + i
        for n, p in got.items():  # each side's own update (p_after − p_before) in this step
            err = rel(p.double() - ours_before[i][n].double(), ref_history[s][n].double() - ref_before[s][n].double())
            if err > TOL:
                bad[(s, n)] = err
    assert not bad, f"updates off the reference (step, parameter): {bad}"
    for (n, k), want in ref_state.items():
        if (n, k) in state:
            got = state[(n, k)]
            ok = torch.equal(got, want) if k == "step" else rel(got, want) <= TOL
            assert ok, (n, k, rel(got, want) if k != "step" else (got, want))
    for n in FUSED:
        assert state[(n, "exp_avg")].any() and state[(n, "momentum_buffer")].any()


# ----------------------------------------------------------------------------- one process


def test_single_process_equals_separate_muon_matrices_and_adamw_rows(ref):
    params = {n: nn.Parameter(t.clone()) for n, t in full_init().items()}
    opt, sched = make_optimizer(params)
    history = train(params, opt, sched, 0, STEPS)
    assert_matches(history, full_state(opt, params), ref)
    # the AdamW rows are exactly torch.optim.AdamW's (same functional on the same rows)
    for n, f in FUSED.items():
        mask = f.adamw_mask()
        assert torch.equal(history[-1][n][mask], ref[0][-1][n][mask].float()), n


# ----------------------------------------------------------------------------- FSDP 4 and FSDP × TP 2


class _Linears(nn.Module):
    """The 2D fused weights as Linear layers (TP parallelizes modules), the rest as parameters."""

    def __init__(self, fulls):
        super().__init__()
        for n in ("in_proj", "inter", "dense"):
            rows, cols = fulls[n].shape
            setattr(self, n, nn.Linear(cols, rows, bias=False))
            getattr(self, n).weight.data.copy_(fulls[n])


def build(layout: str) -> dict[str, torch.Tensor]:
    """The parameters in ``layout``: "plain", "fsdp" (1-D mesh) or "fsdp_tp" (2 × 2, ColwiseParallel)."""
    fulls = full_init()
    if layout == "plain":
        return {n: nn.Parameter(t.clone()) for n, t in fulls.items()}
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    world = dist.get_world_size()
    root = nn.Module()
    root.linears = _Linears(fulls)
    root.experts = nn.Parameter(fulls["experts"].clone())
    root.bias = nn.Parameter(fulls["bias"].clone())
    if layout == "fsdp":
        fully_shard(root, mesh=init_device_mesh("cpu", (world,)))
    else:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(root.linears, mesh["tp"], {n: ColwiseParallel() for n in ("in_proj", "inter", "dense")})
        fully_shard(root.linears, mesh=mesh["dp"])
        for n in ("experts", "bias"):  # FSDP-style on dp, replicated over tp, on the same 2-D mesh
            setattr(root, n, nn.Parameter(distribute_tensor(fulls[n].clone(), mesh, [Shard(0), Replicate()])))
    return {"in_proj": root.linears.in_proj.weight, "inter": root.linears.inter.weight, "experts": root.experts,
            "dense": root.linears.dense.weight, "bias": root.bias}


def _distributed_run(layout: str, steps: int, save_at=None, root=None):
    """Train ``steps`` steps (saving a DCP checkpoint under ``root`` after ``save_at`` of them)."""
    import torch.distributed as dist

    from dist_muon import checkpoint as ck

    params = build(layout)
    opt, sched = make_optimizer(params)
    report = dm.routing_report(opt)
    history = train(params, opt, sched, 0, save_at or steps)
    if save_at is not None:
        ck.save_checkpoint(root, save_at, _Holder(params), opt, lr_schedulers=[sched])
        history += train(params, opt, sched, save_at, steps)
    cut = _blocks_cut(params)
    state = full_state(opt, params)
    return (history, state, report, cut) if dist.get_rank() == 0 else None


class _Holder(nn.Module):
    """The parameters under their test names, for the checkpoint's model state dict."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        for n, p in params.items():
            self.register_parameter(n, p)


def _blocks_cut(params) -> dict[str, bool]:
    """Whether some rank's shard starts or ends inside a block (along the row dim), per fused weight."""
    import torch.distributed as dist

    from dist_muon.layout import layout_of

    out = {}
    for n, f in FUSED.items():
        layout = layout_of(params[n], list(range(dist.get_world_size())))
        row_dim = len(f.shape) - 2
        edges = {r for runs in layout.runs if runs for _, g, length in runs[row_dim] for r in (g, g + length)}
        period = list(itertools.accumulate(f.sizes * f.interleave, initial=0))
        out[n] = any(0 < e < f.shape[row_dim] and e not in period for e in edges)
    return out


@pytest.fixture(scope="module")
def fsdp4(pool4, tmp_path_factory):
    """The FSDP run on 4 ranks, with a checkpoint after 2 steps: (root, its results on rank 0)."""
    root = str(tmp_path_factory.mktemp("mixed"))
    return root, pool4.run(_distributed_run, "fsdp", STEPS, 2, root)[0]


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_tp"])
def test_distributed_equals_the_reference_with_shards_cutting_blocks(pool4, fsdp4, ref, layout):
    results = fsdp4[1] if layout == "fsdp" else pool4.run(_distributed_run, layout, STEPS)[0]
    history, state, report, cut = results
    assert cut["in_proj"] and cut["inter"], cut
    assert_matches(history, state, ref)
    for j in range(len(GDN.sizes)):
        assert f"in_proj block {j}" in report, report


def test_dcp_resume_at_another_world_size(fsdp4, ref):
    """Two steps under FSDP on 4 ranks, saved; loaded on one process, two more steps."""
    from dist_muon import checkpoint as ck

    root, (history, _, _, _) = fsdp4
    saved = history[1]
    params = build("plain")
    opt, sched = make_optimizer(params)
    assert ck.load_checkpoint(ck.latest_checkpoint(root), _Holder(params), opt, lr_schedulers=[sched])["step"] == 2
    assert all(torch.equal(layouts.full_of(p.detach()), saved[n]) for n, p in params.items())
    history = train(params, opt, sched, 2, STEPS)
    assert_matches(history, full_state(opt, params), ref, first_step=2, start=saved)


# ----------------------------------------------------------------------------- validation


def _one(options: dict, algorithm="muon", **kwargs):
    w = nn.Parameter(torch.randn(12, 8))
    return dm.DistMuon([{"params": [w], "param_names": ["in_proj.weight"], "algorithm": algorithm, **options}],
                       lr=0.02, **kwargs)


@pytest.mark.parametrize("options, match", [
    ({"split_sizes": (4, 4, 4), "block_algorithms": ("muon", "adam", "muon")}, r"in_proj.weight: block_algorithms"),
    ({"split_sizes": (4, 4, 4), "block_algorithms": ("muon", "adamw")}, r"2 block algorithms for 3 split_sizes"),
    ({"split_sizes": (4, 4, 3), "block_algorithms": ("muon", "adamw", "adamw")}, r"sum to 11 but dim 0 has size 12"),
    ({"block_algorithms": ("muon", "adamw")}, r"need split_sizes"),
    ({"split_sizes": (6, 6), "block_algorithms": ("adamw", "adamw")}, r"route the whole parameter to 'adamw'"),
    ({"split_sizes": (6, 6), "block_algorithms": "muon"}, r"must be a list"),
    ({"split_sizes": (6, 6), "block_algorithms": ("muon", "muon"), "adamw_lr": 0.1}, r"adamw_lr applies to the 'adamw'"),
    ({"split_sizes": (6, 6), "block_algorithms": ("muon", "adamw"), "adamw_betas": (0.9, 1.5)}, r"betas\[1\]"),
])
def test_bad_block_options_are_refused_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        _one(options)


def test_blocks_need_a_muon_group_and_no_cuda_graph():
    with pytest.raises(ValueError, match=r"block_algorithms needs algorithm 'muon'"):
        _one({"split_sizes": (6, 6), "block_algorithms": ("muon", "adamw")}, algorithm="normuon")
    with pytest.raises(ValueError, match=r"view option 'block_algorithms' applies to muon"):
        _one({"block_algorithms": ("muon", "adamw")}, algorithm="adamw")
    with pytest.raises(ValueError, match=r"cuda_graph=True does not support AdamW blocks"):
        _one({"split_sizes": (6, 6), "block_algorithms": ("muon", "adamw")}, cuda_graph=True)


def test_routing_report_shows_every_block():
    model = nn.Module()
    model.in_proj = nn.Linear(8, 27, bias=False)
    groups = dm.build_param_groups(model, rules=[(r"in_proj", GDN.options)])
    report = dm.routing_report(groups)
    lines = {line.split()[1] + " " + line.split()[2]: line.split() for line in report.splitlines()
             if "block " in line}
    assert len(lines) == 6, report
    assert lines["block 0"][3:7] == ["1×6×8", "muon", "block_algorithms", "1×6×8"], report
    assert lines["block 3"][3:7] == ["1×4×8", "adamw", "block_algorithms", "-"], report
    assert "muon+adamw" in report and "1 with blocks" in report


def test_torchtitan_rules_reach_block_algorithms_and_state_dtype(tmp_path):
    """The [optimizer] section of a 0.2.2 TOML: a rule with blocks and AdamW settings, state_dtype."""
    from test_torchtitan_config import debug_toml_with, parse

    from dist_muon.integrations import torchtitan as dm_titan

    toml = debug_toml_with(
        'state_dtype = "bfloat16"\n'
        "rules = [{pattern = 'in_proj', split_sizes = [6, 6, 6, 4, 3, 2], "
        "block_algorithms = ['muon', 'muon', 'muon', 'adamw', 'adamw', 'adamw'], adamw_lr = 0.003}]")
    config = parse(toml=toml, tmp_path=tmp_path)
    model = nn.Module()
    model.in_proj = nn.Linear(8, 27, bias=False)
    groups = dm.build_param_groups(model, rules=dm_titan.parse_rules(config.optimizer.rules))
    opt = dm.DistMuon(groups, **dm_titan.distmuon_kwargs(config.optimizer))
    (group,) = opt.param_groups
    assert group["block_algorithms"] == GDN.algos and group["adamw_lr"] == 0.003
    assert opt.state[model.in_proj.weight]["exp_avg"].dtype == torch.bfloat16
    bad = debug_toml_with("rules = [{pattern = 'in_proj', split_sizes = [6, 6, 6, 4, 3, 2], "
                          "block_algorithms = ['muon', 'adamw']}]")
    config = parse(toml=bad, tmp_path=tmp_path)
    with pytest.raises(ValueError, match=r"in_proj.weight: 2 block algorithms for 6 split_sizes blocks"):
        dm.DistMuon(dm.build_param_groups(model, rules=dm_titan.parse_rules(config.optimizer.rules)),
                    **dm_titan.distmuon_kwargs(config.optimizer))
