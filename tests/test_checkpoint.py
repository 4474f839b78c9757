"""DCP checkpoints of DistMuon: resharding across world sizes and layouts, validation, init-step safety.

Every resume test runs 3 steps on one layout, saves, loads on another layout / world size, runs 3
more steps, and compares parameters and optimizer state with 6 uninterrupted single-process steps
on full tensors (the engine is sharding-invariant, see test_sharding_invariance.py).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from torch import nn


FP32 = dict(lr=0.05, weight_decay=0.1, adamw_lr=0.01, ns_dtype=torch.float32, bucket_bytes=4096)
RULES = ((r"^gate\.weight$", {"algorithm": "muown"}), (r"^head\.weight$", {"lr": 0.02}))
TOL = 1e-5


# ----------------------------------------------------------------------------- model, layouts, training


class Tiny(nn.Module):
    """Embedding, Linears (muon), a Muown Linear, 3D experts [E, M, N] (muon), norm + bias + head (adamw)."""

    def __init__(self, vocab=32, dim=16, hidden=24, experts=4, moe=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.moe = nn.Module()
        if moe:
            self.moe.experts = nn.Parameter(torch.randn(experts, hidden, dim) / 4)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)


def make_model(moe=True) -> nn.Module:
    torch.manual_seed(1234)
    return Tiny(moe=moe)


def apply_layout(model: nn.Module, layout: str) -> nn.Module:
    """'plain' (no sharding), 'fsdp' (1-D mesh), 'hsdp' (2 × W/2), 'ep' (experts on ('efsdp','ep'), rest FSDP)."""
    if layout == "plain":
        return model
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    world = dist.get_world_size()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    elif layout == "ep":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
        ep_mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("efsdp", "ep"))
        experts = model.moe.experts
        model.moe.experts = nn.Parameter(distribute_tensor(experts.detach().clone(), ep_mesh, [Shard(0), Shard(0)]))
        for name in ("up", "gate", "down", "head"):
            fully_shard(getattr(model, name), mesh=mesh)
        return model
    else:
        raise ValueError(layout)
    for name in ("up", "gate", "down", "head"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_optimizer(model, **kwargs):
    import dist_muon as dm

    options = {**FP32, **kwargs}
    opt = dm.DistMuon(dm.build_param_groups(model, rules=RULES), **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
    return opt, sched


def grad_for(name: str, shape, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * step)
    return torch.randn(*shape, generator=g)


def set_grads(model: nn.Module, step: int) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    import dist_muon as dm

    for raw, p in model.named_parameters():
        full = grad_for(dm.canonical_fqn(raw), p.shape, step)
        p.grad = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full


def train_steps(model, opt, sched, start: int, stop: int) -> None:
    for step in range(start, stop):
        set_grads(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()


def snapshot(model, opt) -> dict:
    """Full (unsharded) parameters, optimizer state and group lrs, by FQN."""
    from torch.distributed.tensor import DTensor

    import dist_muon as dm

    full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
    names = {id(p): dm.canonical_fqn(n) for n, p in model.named_parameters()}
    out = {f"param:{names[id(p)]}": full(p) for p in model.parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            out[f"lr:{names[id(p)]}"] = torch.tensor(group["lr"], dtype=torch.float64)
            for k, v in opt.state[p].items():
                out[f"state:{names[id(p)]}:{k}"] = full(v).float()
    return out


def run_segment(layout, start, stop, load_from=None, save_to=None, moe=True, opt_kwargs=None, checksums=False):
    """On every rank: build, optionally load, train [start, stop), optionally save; rank 0 returns a snapshot."""
    import torch.distributed as dist

    from dist_muon import checkpoint as ck

    model = apply_layout(make_model(moe), layout)
    opt, sched = make_optimizer(model, **(opt_kwargs or {}))
    if load_from is not None:
        loaded = ck.load_checkpoint(load_from, model, opt, lr_schedulers=[sched])
        assert loaded["step"] == start, loaded
    train_steps(model, opt, sched, start, stop)
    if save_to is not None:
        ck.save_checkpoint(save_to, stop, model, opt, lr_schedulers=[sched], checksums=checksums)
    snap = snapshot(model, opt)
    return snap if (not dist.is_initialized() or dist.get_rank() == 0) else None


def reference(moe=True, steps=6) -> dict:
    model = make_model(moe)
    opt, sched = make_optimizer(model)
    train_steps(model, opt, sched, 0, steps)
    return snapshot(model, opt)


def assert_close(got: dict, want: dict, tol=TOL) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    bad = {}
    for k, w in want.items():
        g = got[k]
        err = float((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30))
        if err > tol:
            bad[k] = err
    assert not bad, f"differs from the uninterrupted run: {bad}"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def ref_moe():
    return reference(moe=True)


class _InProcess:
    """World size 1 without torch.distributed at all: a user loading a sharded checkpoint in one process."""

    def run(self, fn, *args, **kwargs):
        return [fn(*args, **kwargs)]


def _pools(pool2, pool4):
    return {1: _InProcess(), 2: pool2, 4: pool4}


# ----------------------------------------------------------------------------- resharding


@pytest.mark.parametrize(
    "save, load",
    [
        ((4, "fsdp"), (2, "fsdp")),  # FSDP 4 → 2, dense + 3D experts Shard(0)
        ((4, "ep"), (2, "ep")),  # experts on ('efsdp', 'ep'): (2, 2) → (1, 2)
        ((4, "fsdp"), (4, "hsdp")),  # FSDP → HSDP
        ((4, "fsdp"), (1, "plain")),  # 4 → 1
        ((2, "fsdp"), (1, "plain")),  # 2 → 1
        ((1, "plain"), (2, "fsdp")),  # 1 → 2
    ],
    ids=lambda x: f"{x[1]}{x[0]}",
)
def test_resume_reshards_bit_for_bit(save, load, pool2, pool4, ckpt_root, ref_moe):
    pools = _pools(pool2, pool4)
    root = os.path.join(ckpt_root, f"{save[1]}{save[0]}_to_{load[1]}{load[0]}")
    pools[save[0]].run(run_segment, save[1], 0, 3, None, root)
    from dist_muon import checkpoint as ck

    path = ck.latest_checkpoint(root)
    assert path and path.endswith("step-3")
    got = pools[load[0]].run(run_segment, load[1], 3, 6, path)[0]
    assert_close(got, ref_moe)


# ----------------------------------------------------------------------------- validation


def _fsdp_checkpoint(pool, root):
    """A W=len(pool) FSDP checkpoint at step 3 under root (made once per root)."""
    from dist_muon import checkpoint as ck

    if ck.latest_checkpoint(root) is None:
        pool.run(run_segment, "fsdp", 0, 3, None, root)
    return ck.latest_checkpoint(root)


def _load_expect_error(layout, path, moe=True, rules=None, opt_kwargs=None, verify="sizes"):
    """Load into a fresh model/optimizer; return the CheckpointError text and whether anything changed."""
    from dist_muon import checkpoint as ck

    global RULES
    saved_rules = RULES
    if rules is not None:
        RULES = rules
    try:
        model = apply_layout(make_model(moe), layout)
        opt, sched = make_optimizer(model, **(opt_kwargs or {}))
    finally:
        RULES = saved_rules
    before = snapshot(model, opt)
    try:
        ck.load_checkpoint(path, model, opt, lr_schedulers=[sched], verify=verify)
    except ck.CheckpointError as e:
        after = snapshot(model, opt)
        untouched = all(torch.equal(before[k], after[k]) for k in before)
        return str(e), untouched
    return None, True


def test_routing_mismatch_names_the_parameter(pool2, ckpt_root):
    path = _fsdp_checkpoint(pool2, os.path.join(ckpt_root, "valid2"))
    # down.weight was muon when saved; route it to adamw now; gate.weight was muown, now muon.
    rules = ((r"^down\.weight$", {"algorithm": "adamw"}), (r"^head\.weight$", {"lr": 0.02}))
    results = pool2.run(_load_expect_error, "fsdp", path, True, rules)
    for message, untouched in results:
        assert message is not None, "loading a checkpoint with different routing must fail"
        assert "down.weight: routed to 'muon' in the checkpoint" in message and "'adamw' now" in message, message
        assert "gate.weight" in message, message
        assert untouched, "a failed load must not change parameters or optimizer state"


def test_missing_parameters_and_shapes(pool2, ckpt_root):
    path = _fsdp_checkpoint(pool2, os.path.join(ckpt_root, "valid2"))
    # a model without the experts: the checkpoint has optimizer state for a parameter we lack
    results = pool2.run(_load_expect_error, "fsdp", path, False)
    assert results[0][0] and "moe.experts" in results[0][0] and results[0][1], results[0]
    # a different shape: build the model with a different expert count via monkeypatched default
    results = pool2.run(_load_shape_mismatch, path)
    assert results[0][0] and "moe.experts" in results[0][0] and "shape" in results[0][0], results[0]
    assert results[0][1]


def _load_shape_mismatch(path):
    global make_model
    original = make_model

    def six_experts(moe=True):
        torch.manual_seed(1234)
        return Tiny(experts=6, moe=moe)

    make_model = six_experts
    try:
        return _load_expect_error("fsdp", path)
    finally:
        make_model = original


def _drop_optimizer_key_and_load(path, out):
    """Rewrite the checkpoint without one optimizer state entry (same ranks), then try to load it."""
    import torch.distributed.checkpoint as dcp

    from dist_muon import checkpoint as ck

    model = apply_layout(make_model(), "fsdp")
    opt, sched = make_optimizer(model)
    ck.load_checkpoint(path, model, opt, lr_schedulers=[sched])
    state = ck.training_state_dict(model, opt)
    del state["optim"]["state.up.weight.momentum_buffer"]
    state["lr_schedulers"] = [sched.state_dict()]
    state["train_state"] = {"step": 3, "world_size": 2, "extra": {}}
    dcp.save(state, checkpoint_id=out)
    return _load_expect_error("fsdp", out)


def test_missing_optimizer_key(pool2, ckpt_root):
    path = _fsdp_checkpoint(pool2, os.path.join(ckpt_root, "valid2"))
    out = os.path.join(ckpt_root, "dropped", "step-3")
    # no completion marker: rejected as incomplete unless verify="none"; check the key error via verify="none"
    message, untouched = pool2.run(_drop_optimizer_key_and_load, path, out)[0]
    assert message and "incomplete" in message and "COMPLETE.json" in message, message
    results = pool2.run(_load_unverified, out)
    assert results[0][0] and "up.weight" in results[0][0] and "momentum_buffer" in results[0][0], results[0]
    assert results[0][1]


def _load_unverified(path):
    from dist_muon import checkpoint as ck

    model = apply_layout(make_model(), "fsdp")
    opt, _ = make_optimizer(model)
    before = snapshot(model, opt)
    try:
        ck.validate_checkpoint(path, model, opt, verify="none")
    except ck.CheckpointError as e:
        return str(e), all(torch.equal(before[k], v) for k, v in snapshot(model, opt).items())
    return None, True


def _copy(src, dst):
    import shutil

    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def test_corrupt_and_partial_checkpoints(pool2, ckpt_root):
    from dist_muon import checkpoint as ck

    path = _fsdp_checkpoint(pool2, os.path.join(ckpt_root, "valid2"))
    bad_root = os.path.join(ckpt_root, "bad")
    # garbage bytes inside a .distcp file (same length: only a checksum can tell, so opt in to both)
    hashed_root = os.path.join(ckpt_root, "hashed")
    pool2.run(run_segment, "fsdp", 0, 3, None, hashed_root, checksums=True)
    corrupt = os.path.join(bad_root, "corrupt", "step-3")
    _copy(ck.latest_checkpoint(hashed_root), corrupt)
    distcp = sorted(f for f in os.listdir(corrupt) if f.endswith(".distcp"))[0]
    with open(os.path.join(corrupt, distcp), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(corrupt, distcp)) // 2)
        f.write(os.urandom(64))
    message, untouched = pool2.run(_load_expect_error, "fsdp", corrupt, verify="sha256")[0]
    assert message and "corrupt" in message and distcp in message, message
    assert untouched
    # verify="sha256" on a checkpoint saved without checksums: says how to proceed
    message, untouched = pool2.run(_load_expect_error, "fsdp", path, verify="sha256")[0]
    assert message and "saved without checksums" in message and "checksums=True" in message, message
    assert untouched
    # truncated file: the default size check catches it
    truncated = os.path.join(bad_root, "truncated", "step-3")
    _copy(path, truncated)
    with open(os.path.join(truncated, distcp), "r+b") as f:
        f.truncate(100)
    message, _ = pool2.run(_load_expect_error, "fsdp", truncated)[0]
    assert message and "truncated or corrupt" in message, message
    # no .metadata
    no_meta = os.path.join(bad_root, "nometa", "step-3")
    _copy(path, no_meta)
    os.remove(os.path.join(no_meta, ".metadata"))
    message, _ = pool2.run(_load_expect_error, "fsdp", no_meta)[0]
    assert message and ".metadata" in message, message
    assert ck.latest_checkpoint(os.path.dirname(no_meta)) is None
    # no completion marker (dcp.save interrupted on some rank): rejected, never the latest
    no_marker = os.path.join(bad_root, "nomarker", "step-3")
    _copy(path, no_marker)
    os.remove(os.path.join(no_marker, ck.MARKER))
    message, _ = pool2.run(_load_expect_error, "fsdp", no_marker)[0]
    assert message and "incomplete" in message, message
    assert ck.latest_checkpoint(os.path.dirname(no_marker)) is None


def test_integrity_check_reads_metadata_only_by_default(tmp_path, monkeypatch):
    """Saving and loading read no checkpoint data for integrity unless checksums are asked for."""
    from dist_muon import checkpoint as ck

    hashed = []
    real_sha256 = ck._sha256
    monkeypatch.setattr(ck, "_sha256", lambda p: hashed.append(os.path.basename(p)) or real_sha256(p))
    model = make_model()
    opt, sched = make_optimizer(model)
    path = ck.save_checkpoint(str(tmp_path / "plain"), 1, model, opt, lr_schedulers=[sched])
    ck.load_checkpoint(path, model, opt, lr_schedulers=[sched])
    assert hashed == [], f"the default save/load hashed {hashed}"
    manifest = ck.verify_files(path)
    assert manifest["files"] and all(set(info) == {"bytes"} for info in manifest["files"].values())

    path = ck.save_checkpoint(str(tmp_path / "hashed"), 1, model, opt, lr_schedulers=[sched], checksums=True)
    files = sorted(ck.verify_files(path)["files"])
    assert sorted(hashed) == files
    hashed.clear()
    ck.load_checkpoint(path, model, opt, lr_schedulers=[sched])
    assert hashed == [], "checksums in the manifest must not make the default load read the data"
    ck.load_checkpoint(path, model, opt, lr_schedulers=[sched], verify="sha256")
    assert sorted(hashed) == files
    with pytest.raises(ValueError, match=r"verify='full'.*'sizes'.*'sha256'"):
        ck.load_checkpoint(path, model, opt, verify="full")


def test_regrouped_parameters_are_rejected_before_loading(pool2, ckpt_root):
    """Same routing, keys and shapes, but head.weight shared a group with the other AdamW parameters when
    saved and has its own now: DCP would write the tensors and only then DistMuon.load_state_dict object
    (or, grouped the other way, silently take another parameter's hyperparameters)."""
    path = _fsdp_checkpoint(pool2, os.path.join(ckpt_root, "valid2"))
    rules = ((r"^gate\.weight$", {"algorithm": "muown"}),)  # no separate head group
    for message, untouched in pool2.run(_load_expect_error, "fsdp", path, True, rules):
        assert message is not None, "loading a checkpoint with other param groups must fail"
        assert "head.weight: its param group holds ['head.weight'] in the checkpoint" in message, message
        assert untouched, "a failed load must not change parameters or optimizer state"


def test_latest_ignores_tmp_and_incomplete(tmp_path, ckpt_root, pool2):
    from dist_muon import checkpoint as ck

    path = _fsdp_checkpoint(pool2, os.path.join(ckpt_root, "valid2"))
    root = str(tmp_path)
    _copy(path, os.path.join(root, "step-3"))
    _copy(path, os.path.join(root, "step-9.tmp"))  # an interrupted save (even with every file present)
    os.makedirs(os.path.join(root, "step-12"))  # created, nothing written
    _copy(path, os.path.join(root, "step-6"))
    os.remove(os.path.join(root, "step-6", ck.MARKER))
    assert ck.latest_checkpoint(root) == os.path.join(root, "step-3")
    assert [s for s, _ in ck.complete_checkpoints(root)] == [3]
    assert ck.latest_checkpoint(os.path.join(root, "nothing-here")) is None


# ----------------------------------------------------------------------------- hyperparameters and schedulers


def _precedence(path):
    """Constructor says lr=0.3, momentum=0.5; the checkpoint's per-group values win (torch.optim semantics)."""
    from dist_muon import checkpoint as ck

    model = apply_layout(make_model(), "fsdp")
    opt, sched = make_optimizer(model, lr=0.3, momentum=0.5, adamw_lr=0.3)
    ck.load_checkpoint(path, model, opt, lr_schedulers=[sched])
    return [(g["param_names"], g["algorithm"], g["lr"], g["initial_lr"], g.get("momentum")) for g in opt.param_groups], sched.last_epoch


def test_checkpoint_hyperparameters_win_and_scheduler_resumes(pool2, ckpt_root):
    path = _fsdp_checkpoint(pool2, os.path.join(ckpt_root, "valid2"))
    groups, last_epoch = pool2.run(_precedence, path)[0]
    assert last_epoch == 3
    factor = 1.0 / (1.0 + 0.5 * 3)
    initial = {"muon": 0.05, "muown": 0.05, "adamw": 0.01}
    for names, algorithm, lr, initial_lr, momentum in groups:
        want = 0.02 if names == ["head.weight"] else initial[algorithm]
        assert initial_lr == pytest.approx(want), (names, initial_lr)
        assert lr == pytest.approx(want * factor), (names, lr)
        if algorithm != "adamw":
            assert momentum == 0.95, "the checkpoint's momentum wins over the constructor's"


# ----------------------------------------------------------------------------- DCP's zero-lr init step


def _init_optim_state_is_harmless():
    from torch.distributed.checkpoint.state_dict import StateDictOptions, _init_optim_state, get_optimizer_state_dict

    model = apply_layout(make_model(), "fsdp")
    opt, _ = make_optimizer(model)
    before = snapshot(model, opt)
    _init_optim_state(opt)  # what get/set_optimizer_state_dict run first
    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    after = snapshot(model, opt)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    # also the explicit zero-grad, zero-lr step DCP would run on an optimizer with empty state
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    stepped = snapshot(model, opt)
    changed_by_step = {
        k: float((stepped[k].double() - before[k].double()).norm() / before[k].double().norm().clamp_min(1e-30))
        for k in before if not torch.equal(before[k], stepped[k])
    }
    return changed, grads, sorted(k for k in sd if k.startswith("state.")), changed_by_step


def test_dcp_init_step_leaves_params_and_state_untouched(pool2):
    changed, grads, keys, changed_by_step = pool2.run(_init_optim_state_is_harmless)[0]
    assert not changed and not grads
    assert "state.moe.experts.momentum_buffer" in keys and "state.embed.weight.exp_avg_sq" in keys
    assert "state.gate.weight.magnitude" in keys
    # DistMuon's state is eager, so DCP never runs its init step (checked above). Were it run, a zero-grad
    # zero-lr step changes no Muon/AdamW parameter, momentum or moment; AdamW/Muown step counters advance
    # (as torch.optim.AdamW's do), and Muown's decompose/recompose round trip moves its weight, magnitude
    # and direction norm by float32 rounding only (~4e-8 relative; not a bitwise identity).
    counters = {k for k in changed_by_step if k.endswith(":step")}
    muown = {k for k in changed_by_step if "gate.weight" in k and k not in counters}
    assert set(changed_by_step) == counters | muown, changed_by_step
    assert all(changed_by_step[k] < 1e-6 for k in muown), changed_by_step


# ----------------------------------------------------------------------------- DistMuon.load_state_dict (torch format)


def test_load_state_dict_validates_then_loads():
    model = make_model()
    opt, sched = make_optimizer(model)
    train_steps(model, opt, sched, 0, 2)
    sd = opt.state_dict()
    # a fresh optimizer with a different constructor lr: the saved values win, state is loaded
    fresh_model = make_model()
    fresh, _ = make_optimizer(fresh_model, lr=0.5, adamw_lr=0.5)
    fresh.load_state_dict(sd)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, fresh.state[q][k]), k
    # different routing: down.weight muon → adamw
    import dist_muon as dm

    other = make_model()
    rerouted = dm.DistMuon(dm.build_param_groups(other, rules=((r"^down\.weight$", {"algorithm": "adamw"}),)), **FP32)
    before = {k: v.clone() for k, v in rerouted.state[other.down.weight].items()}
    with pytest.raises(ValueError, match=r"param group|down\.weight|routed"):
        rerouted.load_state_dict(sd)
    assert all(torch.equal(v, rerouted.state[other.down.weight][k]) for k, v in before.items())
    # same groups, but one parameter's state is missing / has a different shape
    bad = {"state": dict(sd["state"]), "param_groups": sd["param_groups"]}
    index = sd["param_groups"][0]["params"][0]
    name = sd["param_groups"][0]["param_names"][0]
    del bad["state"][index]
    with pytest.raises(ValueError, match=rf"{name}: no optimizer state"):
        fresh.load_state_dict(bad)
    bad["state"][index] = {k: (v[..., :1] if v.ndim else v) for k, v in sd["state"][index].items()}
    with pytest.raises(ValueError, match=rf"{name}: optimizer state '.*' has shape"):
        fresh.load_state_dict(bad)
    # a state dict saved with the other routing: keys differ and the message says which algorithms
    swapped = {"state": dict(sd["state"]), "param_groups": [dict(g) for g in sd["param_groups"]]}
    muon = next(g for g in swapped["param_groups"] if g["algorithm"] == "muon")
    swapped["state"][muon["params"][0]] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"routed to 'adamw' in the state dict but 'muon' now"):
        fresh.load_state_dict(swapped)
