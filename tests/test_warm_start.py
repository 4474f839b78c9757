"""Warm starts: loading a checkpoint whose routing differs from the live DistMuon's (``on_routing_change``).

* convert, AdamW → DistMuon: ``torch.optim.AdamW`` trains K steps and is saved (DCP, or a torch-format
  state dict); DistMuon loads it with "convert". Its first step on the Muon-routed parameters equals
  the fp64 update rule with the momentum seeded from ``exp_avg`` (exactly when β1 = momentum, by the
  documented factor otherwise); the AdamW-routed parameters continue exactly as the uninterrupted
  AdamW run. At W=1 and FSDP W=2, saved at one world size and loaded at the other too.
* convert, DistMuon → DistMuon with other routing: ``exp_avg`` from the momentum, ``exp_avg_sq`` and
  ``step`` fresh, Muown reset; ``"reset"``: the moved parameters take exactly a fresh optimizer's step,
  every other parameter continues as the uninterrupted run.
* the default still refuses, naming the parameter and both algorithms, and writes nothing.
"""

from __future__ import annotations

import os

import pytest
import torch

from reference import muon_step64
from test_checkpoint import _InProcess, apply_layout, grad_for, make_model, set_grads, snapshot

K = 3  # steps before the switch
MU = 0.95
ADAMW = dict(lr=0.01, betas=(MU, 0.99), eps=1e-8, weight_decay=0.1)  # beta1 == momentum: an exact seed
MUON = dict(lr=0.05, momentum=MU, weight_decay=0.1, ns_dtype=torch.float32, bucket_bytes=4096,
            adamw_lr=0.3, adamw_betas=(0.5, 0.5), adamw_weight_decay=0.0)  # AdamW values the checkpoint's replace
MUON_ROUTED = ("up.weight", "gate.weight", "down.weight", "moe.experts")
ADAMW_ROUTED = ("embed.weight", "up.bias", "norm.weight", "norm.bias", "head.weight")
# DistMuon → DistMuon: saved with the default routing, loaded with these
MOVED_RULES = ((r"^down\.weight$", {"algorithm": "adamw"}), (r"^gate\.weight$", {"algorithm": "muown"}),
               (r"^head\.weight$", {"algorithm": "muon"}))
TOL = 1e-5


def rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def distmuon(model, rules=(), **kwargs):
    import dist_muon as dm

    return dm.DistMuon(dm.build_param_groups(model, rules=rules), **{**MUON, **kwargs})


def adamw(model, betas=ADAMW["betas"]):
    return torch.optim.AdamW(model.named_parameters(), **{**ADAMW, "betas": betas})


def train(model, opt, start: int, stop: int) -> None:
    for step in range(start, stop):
        set_grads(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- pool functions (every rank)


def save_adamw_run(layout: str, root: str, betas=ADAMW["betas"]) -> None:
    from dist_muon import checkpoint as ck

    model = apply_layout(make_model(), layout)
    opt = adamw(model, betas)
    train(model, opt, 0, K)
    ck.save_checkpoint(root, K, model, opt)


def save_distmuon_run(layout: str, root: str):
    from dist_muon import checkpoint as ck

    model = apply_layout(make_model(), layout)
    opt = distmuon(model)
    train(model, opt, 0, K)
    ck.save_checkpoint(root, K, model, opt)
    before = snapshot(model, opt)
    train(model, opt, K, K + 1)  # the uninterrupted run's next step
    after = snapshot(model, opt)  # collective (full tensors): on every rank
    return (before, after) if rank0() else None


def resume(layout: str, path: str, mode: str, rules=(), steps: int = 2, state_dict_of=None, **kwargs):
    """Load with ``mode``; snapshots after loading and after each of ``steps`` steps, and the report."""
    from dist_muon import checkpoint as ck
    from dist_muon import warm_start

    model = apply_layout(make_model(), layout)
    opt = distmuon(model, rules, **kwargs)
    if state_dict_of is None:
        report = ck.load_checkpoint(path, model, opt, on_routing_change=mode, log=None)["warm_start"]
    else:  # a torch-format state dict; the model's weights are loaded first
        saved = torch.load(path, weights_only=False)
        set_weights(model, saved["model"])
        report = warm_start.load_state_dict(model, opt, saved["optim"], on_routing_change=mode, log=None)
    snaps = [snapshot(model, opt)]
    for step in range(K, K + steps):
        set_grads(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        snaps.append(snapshot(model, opt))
    groups = {n: {k: v for k, v in g.items() if k not in ("params", "param_names")}
              for g in opt.param_groups for n in g["param_names"]}
    return (snaps, str(report), groups) if rank0() else None


def set_weights(model, full: dict) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    import dist_muon as dm

    with torch.no_grad():
        for name, p in model.named_parameters():
            value = full[dm.canonical_fqn(name)]
            p.copy_(distribute_tensor(value, p.device_mesh, p.placements) if isinstance(p, DTensor) else value)


def load_expecting_refusal(layout: str, path: str):
    from dist_muon import checkpoint as ck

    model = apply_layout(make_model(), layout)
    opt = distmuon(model)
    before = snapshot(model, opt)
    try:
        ck.load_checkpoint(path, model, opt)
    except ck.CheckpointError as e:
        after = snapshot(model, opt)
        return str(e), all(torch.equal(before[k], after[k]) for k in before)
    return None, True


# ----------------------------------------------------------------------------- references (this process)


def adamw_reference(steps: int, betas=ADAMW["betas"]) -> list[dict]:
    """The uninterrupted single-process AdamW run: snapshots after K, K+1, ... K+steps steps."""
    model = make_model()
    opt = adamw(model, betas)
    train(model, opt, 0, K)
    snaps = [adamw_snapshot(model, opt)]
    for step in range(K, K + steps):
        train(model, opt, step, step + 1)
        snaps.append(adamw_snapshot(model, opt))
    return snaps


def adamw_snapshot(model, opt) -> dict:
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out.update({f"state:{n}:{k}": v.detach().clone().float() for k, v in opt.state[p].items()})
    return out


def matrices(name: str):
    """How the Tiny model's Muon parameters are views of matrices (experts: one per expert)."""
    if name == "moe.experts":
        return lambda t: [(i, t[i]) for i in range(t.shape[0])]
    return lambda t: [(slice(None), t)]


def muon_first_step(p, buf, name: str, step: int):
    """The fp64 update rule for one step from (p, buf) with this step's gradient."""
    g = grad_for(name, p.shape, step)
    return muon_step64(p, g, buf, lr=MUON["lr"], momentum=MU, nesterov=True, weight_decay=MUON["weight_decay"],
                       method="polar_express", adjust_lr="original", matrices=matrices(name))


def check_adamw_to_distmuon(got_snaps, want, factor: float = 1.0) -> None:
    loaded, first = got_snaps[0], got_snaps[1]
    for name in MUON_ROUTED:
        seed = want[0][f"state:{name}:exp_avg"].double() * factor
        assert rel(loaded[f"state:{name}:momentum_buffer"], seed) < 1e-6, name
        p_ref, buf_ref = muon_first_step(want[0][f"param:{name}"], seed, name, K)
        assert rel(first[f"param:{name}"], p_ref) < TOL, (name, rel(first[f"param:{name}"], p_ref))
        assert rel(first[f"state:{name}:momentum_buffer"], buf_ref) < TOL, name
    for i, snap in enumerate(got_snaps):  # AdamW-routed: as if nothing had happened
        for name in ADAMW_ROUTED:
            for key in (f"param:{name}", *(f"state:{name}:{k}" for k in ("exp_avg", "exp_avg_sq", "step"))):
                assert rel(snap[key], want[i][key]) < 1e-6, (i, key, rel(snap[key], want[i][key]))


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def want():
    return adamw_reference(2)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("warm"))


@pytest.mark.parametrize("save, load", [((1, "plain"), (1, "plain")), ((2, "fsdp"), (2, "fsdp")),
                                        ((2, "fsdp"), (1, "plain")), ((1, "plain"), (2, "fsdp"))],
                         ids=lambda x: f"{x[1]}{x[0]}")
def test_convert_adamw_checkpoint(save, load, pool2, root, want):
    from dist_muon import checkpoint as ck

    pools = {1: _InProcess(), 2: pool2}
    path = os.path.join(root, f"adamw_{save[1]}{save[0]}")
    if ck.latest_checkpoint(path) is None:
        pools[save[0]].run(save_adamw_run, save[1], path)
    snaps, report, groups = pools[load[0]].run(resume, load[1], ck.latest_checkpoint(path), "convert")[0]
    check_adamw_to_distmuon(snaps, want)
    assert "4 converted, 0 reset, 5 kept" in report and "momentum_buffer ← exp_avg" in report, report
    # the kept AdamW groups took the checkpoint's values; the Muon group kept its own
    assert groups["embed.weight"]["lr"] == ADAMW["lr"] and groups["embed.weight"]["betas"] == ADAMW["betas"]
    assert groups["up.weight"]["lr"] == MUON["lr"] and groups["up.weight"]["momentum"] == MU


def test_convert_when_beta1_differs_from_momentum(root):
    """β1 = 0.9, μ = 0.95: momentum_buffer = exp_avg · (1 − μᴷ)/(1 − β1ᴷ)."""
    betas = (0.9, 0.99)
    path = os.path.join(root, "adamw_beta09")
    save_adamw_run("plain", path, betas)
    from dist_muon import checkpoint as ck

    snaps, report, _ = resume("plain", ck.latest_checkpoint(path), "convert")
    factor = (1 - MU ** K) / (1 - 0.9 ** K)
    assert abs(factor - 1) > 0.1  # the rule matters here
    check_adamw_to_distmuon(snaps, adamw_reference(2, betas), factor)
    assert f"× {factor:.4g} (β1=0.9, momentum=0.95, AdamW step 3)" in report, report


def test_convert_adamw_state_dict(pool2, root, want):
    """A torch-format AdamW state dict (full tensors, one process), cut to FSDP shards at W=2."""
    model = make_model()
    opt = adamw(model)
    train(model, opt, 0, K)
    path = os.path.join(root, "adamw_state_dict.pt")
    torch.save({"model": {n: p.detach() for n, p in model.named_parameters()}, "optim": opt.state_dict()}, path)
    snaps, report, _ = pool2.run(resume, "fsdp", path, "convert", state_dict_of=True)[0]
    check_adamw_to_distmuon(snaps, want)
    # without param_names (built from model.parameters()): named by the model's order
    plain = torch.optim.AdamW(model.parameters(), **ADAMW)
    plain.load_state_dict({**opt.state_dict(), "param_groups": [
        {k: v for k, v in g.items() if k != "param_names"} for g in opt.state_dict()["param_groups"]]})
    torch.save({"model": {n: p.detach() for n, p in model.named_parameters()}, "optim": plain.state_dict()}, path)
    snaps, _, _ = resume("plain", path, "convert", state_dict_of=True)
    check_adamw_to_distmuon(snaps, want)


def test_default_refuses_naming_the_parameter_and_both_algorithms(pool2, root):
    from dist_muon import checkpoint as ck

    path = os.path.join(root, "adamw_fsdp2")
    if ck.latest_checkpoint(path) is None:
        pool2.run(save_adamw_run, "fsdp", path)
    for message, untouched in pool2.run(load_expecting_refusal, "fsdp", ck.latest_checkpoint(path)):
        assert message is not None, "the default must refuse a checkpoint with other routing"
        for name in MUON_ROUTED:
            assert f"{name}: routed to 'adamw' in the checkpoint" in message and "'muon' now" in message, message
        assert "on_routing_change='reset' or 'convert'" in message, message
        assert untouched, "a refused load must not change parameters or optimizer state"


@pytest.fixture(scope="module")
def distmuon_run(pool2, root):
    """A DistMuon FSDP W=2 run with the default routing: its checkpoint at K, and snapshots at K and K+1."""
    from dist_muon import checkpoint as ck

    path = os.path.join(root, "distmuon_fsdp2")
    before, after = pool2.run(save_distmuon_run, "fsdp", path)[0]
    return ck.latest_checkpoint(path), before, after


def test_convert_distmuon_checkpoint_with_other_routing(distmuon_run):
    """down.weight muon → adamw (exp_avg from the momentum), head.weight adamw → muon (momentum from
    exp_avg; the saving run's AdamW β1 0.5 ≠ 0.95), gate.weight muon → muown (nothing carries over:
    reset). Saved at W=2, loaded at W=1."""
    path, saved, uninterrupted = distmuon_run
    snaps, report, groups = resume("plain", path, "convert", MOVED_RULES, steps=1)
    loaded, first = snaps
    assert rel(loaded["state:down.weight:exp_avg"], saved["state:down.weight:momentum_buffer"]) == 0
    assert not loaded["state:down.weight:exp_avg_sq"].any() and loaded["state:down.weight:step"] == 0
    step = float(saved["state:head.weight:step"])
    beta1 = MUON["adamw_betas"][0]
    factor = (1 - MU ** step) / (1 - beta1 ** step)
    assert rel(loaded["state:head.weight:momentum_buffer"], saved["state:head.weight:exp_avg"].double() * factor) < 1e-6
    assert "down.weight" in report and "exp_avg ← momentum_buffer; step, exp_avg_sq fresh" in report, report
    assert "fresh state (Muown's momentum is of its direction's gradient" in report, report
    assert "2 converted, 1 reset, 6 kept" in report, report
    # down.weight's first AdamW step, from the converted state, with its (kept) group's hyperparameters
    g = groups["down.weight"]
    p = saved["param:down.weight"].double().clone().requires_grad_(False)
    ref = torch.optim.AdamW([p], lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"])
    ref.state[p] = {"step": torch.tensor(0.0, dtype=torch.float64),
                    "exp_avg": saved["state:down.weight:momentum_buffer"].double().clone(),
                    "exp_avg_sq": torch.zeros_like(p)}
    p.grad = grad_for("down.weight", p.shape, K).double()
    ref.step()
    assert rel(first["param:down.weight"], p) < 1e-6
    check_kept(first, uninterrupted, exclude=("down.weight", "gate.weight", "head.weight"))


def check_kept(got: dict, want: dict, exclude) -> None:
    """Parameters that did not move continue exactly as the uninterrupted run (sharding invariance: W=2 vs 1)."""
    keys = [k for k in want if k.startswith(("param:", "state:")) and k.split(":")[1] not in exclude]
    assert len(keys) > 10
    bad = {k: rel(got[k], want[k]) for k in keys if rel(got[k], want[k]) > TOL}
    assert not bad, bad


def test_reset_gives_moved_parameters_a_fresh_optimizers_step(pool2, distmuon_run):
    path, saved, uninterrupted = distmuon_run
    snaps, report, _ = pool2.run(resume, "fsdp", path, "reset", MOVED_RULES, steps=1)[0]
    loaded, first = snaps
    moved = ("down.weight", "gate.weight", "head.weight")
    assert "0 converted, 3 reset, 6 kept" in report, report
    # the others' state is exactly the checkpoint's
    kept = [k for k in saved if k.startswith("state:") and k.split(":")[1] not in moved]
    assert kept and all(torch.equal(loaded[k], saved[k]) for k in kept)
    check_kept(first, uninterrupted, exclude=moved)
    # a fresh optimizer with the new routing, on the loaded weights, one step, one process
    model = make_model()
    set_weights(model, {k[len("param:"):]: v for k, v in saved.items() if k.startswith("param:")})
    fresh = distmuon(model, MOVED_RULES)
    for key, value in snapshot(model, fresh).items():
        if key.startswith("state:") and key.split(":")[1] in moved:
            assert torch.equal(loaded[key], value), key  # fresh state, Muown's magnitudes from the loaded weights
    train(model, fresh, K, K + 1)
    want = snapshot(model, fresh)
    for key in want:
        if key.startswith(("param:", "state:")) and key.split(":")[1] in moved:
            assert rel(first[key], want[key]) < TOL, (key, rel(first[key], want[key]))


def test_modes_are_validated():
    from dist_muon import checkpoint as ck

    model = make_model()
    with pytest.raises(ValueError, match=r"on_routing_change='keep'.*'refuse', 'reset', 'convert'"):
        ck.load_checkpoint("nowhere", model, distmuon(model), on_routing_change="keep")


# ----------------------------------------------------------------------------- torchtitan 0.2.2 (in process)


def titan_step(model, optimizers, schedulers, step: int) -> None:
    """One step with gradients drawn per parameter name and step: each AdamW-routed parameter's
    update then depends on its own state only, whatever the Muon-routed ones did."""
    for name, p in model.named_parameters():
        p.grad = grad_for(name, p.shape, step).to(p.dtype)
    optimizers.step()
    optimizers.zero_grad()
    schedulers.step()


def titan_checkpointer(model):
    """What ``validate_before_loading`` wraps: torchtitan's own ``CheckpointManager.dcp_load``."""
    import functools
    from types import SimpleNamespace

    from torchtitan.components.checkpoint import CheckpointManager, ModelWrapper

    checkpointer = SimpleNamespace(enable=True, states={"model": ModelWrapper(model)}, sd_adapter=None)
    checkpointer.dcp_load = functools.partial(CheckpointManager.dcp_load, checkpointer)
    return checkpointer


def test_torchtitan_adamw_run_resumes_with_distmuon(tmp_path):
    """torchtitan 0.2.2's AdamW (its OptimizersContainer, flat FQN-keyed state) and LR schedule train
    K steps and are saved as its CheckpointManager saves them; a DistMuon trainer with
    ``on_routing_change = "convert"`` loads that checkpoint through ``validate_before_loading``."""
    pytest.importorskip("torchtitan")
    from importlib.metadata import version

    if not version("torchtitan").startswith("0.2."):
        pytest.skip("torchtitan 0.2.x API (tests/torchtitan030 has the 0.3.0 counterpart)")
    from types import SimpleNamespace

    import torch.distributed.checkpoint as dcp
    from test_torchtitan_config import NO_MESHES, schedulers, tiny_model
    from torchtitan.protocols.train_spec import get_train_spec

    from dist_muon import checkpoint as ck
    from dist_muon.integrations import torchtitan as dm_titan
    from dist_muon.integrations.torchtitan.resume import validate_before_loading

    dm_titan.register("llama3")
    build = get_train_spec("llama3").build_optimizers_fn
    hyper = dict(beta1=MU, beta2=0.99, weight_decay=0.1, log_routing=False)
    saved_model = tiny_model("llama3")
    adamw_config = dm_titan.DistMuonOptimizer(name="AdamW", implementation="for-loop", lr=8e-4, **hyper)
    adamw_opts = build([saved_model], adamw_config, NO_MESHES)
    adamw_scheds = schedulers(adamw_opts, per_group=False)
    for step in range(K):
        titan_step(saved_model, adamw_opts, adamw_scheds, step)
    path = str(tmp_path / "step-3")
    states = {**titan_checkpointer(saved_model).states["model"].state_dict(), "optimizer": adamw_opts,
              "lr_scheduler": adamw_scheds}
    dcp.save(states, checkpoint_id=path)

    def distmuon_trainer(**fields):
        model = tiny_model("llama3")
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)  # other weights than the checkpoint's: the load must replace them
        config = dm_titan.DistMuonOptimizer(name="DistMuon", lr=0.02, adamw_lr=0.004, ns_dtype="float32",
                                            momentum=MU, **hyper, **fields)
        opts = build([model], config, NO_MESHES)
        trainer = SimpleNamespace(checkpointer=titan_checkpointer(model), model_parts=[model], optimizers=opts)
        return trainer, schedulers(opts, per_group=True)

    def load(trainer, scheds):
        states = {**trainer.checkpointer.states["model"].state_dict(), "optimizer": trainer.optimizers,
                  "lr_scheduler": scheds}
        trainer.checkpointer.dcp_load(states, path, False, False)

    # the default refuses, naming the option, and loads nothing
    trainer, scheds = distmuon_trainer()
    validate_before_loading(trainer)
    (opt,) = trainer.optimizers
    before = {k: v.clone() for k, v in opt.state[trainer.model_parts[0].tok_embeddings.weight].items()}
    with pytest.raises(ck.CheckpointError, match=r"(?s)layers\.0\.attention\.wq\.weight: routed to 'adamw' in the "
                                                 r"checkpoint.*'muon' now.*on_routing_change"):
        load(trainer, scheds)
    assert all(torch.equal(v, opt.state[trainer.model_parts[0].tok_embeddings.weight][k]) for k, v in before.items())

    logs = []
    trainer, scheds = distmuon_trainer(on_routing_change="convert")
    validate_before_loading(trainer, log=logs.append)
    load(trainer, scheds)
    model, (opt,) = trainer.model_parts[0], trainer.optimizers
    adamw_state = {n: adamw_opts.optimizers[0].state[p] for n, p in saved_model.named_parameters()}
    by_name = dict(model.named_parameters())
    for name, p in saved_model.named_parameters():
        assert torch.equal(by_name[name], p), name
    routed = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert {g["algorithm"] for g in routed.values()} == {"muon", "adamw"}
    for name, group in routed.items():
        state = opt.state[by_name[name]]
        if group["algorithm"] == "muon":
            assert torch.equal(state["momentum_buffer"], adamw_state[name]["exp_avg"]), name
        else:
            assert all(torch.equal(state[k], adamw_state[name][k]) for k in ("step", "exp_avg", "exp_avg_sq")), name
    # each group resumes the schedule at step K from its own initial lr: AdamW's 8e-4, Muon's 0.02
    factor = adamw_scheds.schedulers[0].get_last_lr()[0] / 8e-4
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx((8e-4 if group["algorithm"] == "adamw" else 0.02) * factor)
    assert len(logs) == 1 and "converted" in logs[0] and "momentum_buffer ← exp_avg" in logs[0], logs
    assert trainer.optimizers.last_warm_start[0].count("converted") == sum(
        g["algorithm"] == "muon" for g in routed.values())
    # the AdamW-routed parameters continue as the uninterrupted AdamW run, schedule included
    for step in (K, K + 1):
        titan_step(saved_model, adamw_opts, adamw_scheds, step)
        titan_step(model, trainer.optimizers, scheds, step)
    for name, group in routed.items():
        if group["algorithm"] == "adamw":
            assert rel(by_name[name].detach(), dict(saved_model.named_parameters())[name].detach()) < 1e-6, name


def test_torchtitan_option_is_validated(tmp_path):
    """``[optimizer] on_routing_change`` from TOML and the command line, checked at parse time."""
    pytest.importorskip("torchtitan")
    from importlib.metadata import version

    if not version("torchtitan").startswith("0.2."):
        pytest.skip("torchtitan 0.2.x TOML configs")
    from test_torchtitan_config import debug_toml_with, parse

    from dist_muon.integrations import torchtitan as dm_titan

    assert parse().optimizer.on_routing_change == "refuse"
    assert parse("--optimizer.on_routing_change", "reset").optimizer.on_routing_change == "reset"
    toml = debug_toml_with('on_routing_change = "convert"')
    assert parse(toml=toml, tmp_path=tmp_path).optimizer.on_routing_change == "convert"
    with pytest.raises(dm_titan.ConfigError, match=r"\[optimizer\] on_routing_change: must be one of "
                                                   r"\['refuse', 'reset', 'convert'\], got 'keep'"):
        parse("--optimizer.on_routing_change", "keep")
