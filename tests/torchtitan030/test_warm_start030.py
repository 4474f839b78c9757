"""torchtitan 0.3.0 warm start, in process: a stock AdamW run (``default_adamw``: its
OptimizersContainer's flat FQN-keyed state, its LR schedule) trains K steps and is saved as the
CheckpointManager saves it; DistMuon with ``on_routing_change="convert"`` loads it through
``resume.validate_before_loading`` and torchtitan 0.3.0's own ``CheckpointManager.dcp_load``
(the 0.2.2 counterpart is in tests/test_warm_start.py)."""

from __future__ import annotations

import functools
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_config import debug_model
from torchtitan.components.checkpointer.base import ModelWrapper
from torchtitan.components.checkpointer.dcp import CheckpointManager
from torchtitan.components.optimizer import default_adamw
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer

from dist_muon import checkpoint as ck
from dist_muon.integrations import torchtitan as dm_titan
from dist_muon.integrations.torchtitan.resume import validate_before_loading
from dist_muon.integrations.torchtitan.trainer import _flat_state

K, MU, ADAMW_LR = 3, 0.95, 8e-4


def step(model, optimizers, schedulers, i: int) -> None:
    """One step with gradients drawn per parameter name and step (the debug model's forward wants
    flex-attention masks; what is tested here is the optimizer state)."""
    for name, p in model.named_parameters():
        seed = zlib.crc32(name.encode()) + 7919 * i
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=p.dtype)
    optimizers.step()
    optimizers.zero_grad()
    schedulers.step()


def schedule(optimizers) -> LRSchedulersContainer:
    return LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=20)


def checkpointer(model):
    manager = SimpleNamespace(enable=True, states={"model": ModelWrapper(model)}, sd_adapter=None)
    manager.dcp_load = functools.partial(CheckpointManager.dcp_load, manager)
    return manager


def test_stock_adamw_checkpoint_resumes_with_distmuon(tmp_path):
    saved_model = debug_model()
    stock = default_adamw(lr=ADAMW_LR, betas=(MU, 0.99))
    stock.implementation = "for-loop"
    adamw = stock.build(model_parts=[saved_model])
    adamw_schedule = schedule(adamw)
    for i in range(K):
        step(saved_model, adamw, adamw_schedule, i)
    path = str(tmp_path / "step-3")
    dcp.save({**checkpointer(saved_model).states["model"].state_dict(), "optimizer": adamw,
              "lr_scheduler": adamw_schedule}, checkpoint_id=path)

    def trainer(**fields):
        model = debug_model()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)  # other weights than the checkpoint's: the load must replace them
        # 0.3.0's schedulers take their base lrs from the config on resume (not the checkpoint's
        # initial_lr): adamw_lr is the AdamW run's lr, so its parameters continue that run's schedule
        opts = dm_titan.DistMuonContainer.Config(lr=0.02, adamw_lr=ADAMW_LR, momentum=MU, adamw_betas=(MU, 0.99),
                                                 ns_dtype="float32", log_routing=False, **fields
                                                 ).build(model_parts=[model])
        return SimpleNamespace(checkpointer=checkpointer(model), model_parts=[model], optimizers=opts), schedule(opts)

    def load(t, schedulers):
        states = {**t.checkpointer.states["model"].state_dict(), "optimizer": t.optimizers,
                  "lr_scheduler": schedulers}
        t.checkpointer.dcp_load(states, path, False, False)

    refusing, schedulers = trainer()
    validate_before_loading(refusing, current=_flat_state)
    with pytest.raises(ck.CheckpointError, match=r"(?s)wqkv\.weight: routed to 'adamw' in the checkpoint.*"
                                                 r"'muon' now.*on_routing_change"):
        load(refusing, schedulers)

    logs = []
    t, schedulers = trainer(on_routing_change="convert")
    validate_before_loading(t, current=_flat_state, log=logs.append)
    load(t, schedulers)
    model, (opt,) = t.model_parts[0], t.optimizers
    params, saved = dict(model.named_parameters()), dict(saved_model.named_parameters())
    adamw_state = {n: adamw.optimizers[0].state[p] for n, p in saved.items()}
    routed = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert {g["algorithm"] for g in routed.values()} == {"muon", "adamw"}
    for name, group in routed.items():
        assert torch.equal(params[name], saved[name]), name
        state = opt.state[params[name]]
        if group["algorithm"] == "muon":  # including the fused, interleaved wqkv: the state mirrors the weight
            assert torch.equal(state["momentum_buffer"], adamw_state[name]["exp_avg"]), name
        else:
            assert all(torch.equal(state[k], adamw_state[name][k]) for k in ("step", "exp_avg", "exp_avg_sq")), name
    assert any(g.get("interleave") for g in opt.param_groups)
    assert len(logs) == 1 and "converted" in logs[0] and "wqkv.weight" in logs[0], logs
    # the AdamW-routed parameters continue as the uninterrupted AdamW run
    for i in (K, K + 1):
        step(saved_model, adamw, adamw_schedule, i)
        step(model, t.optimizers, schedulers, i)
    for name, group in routed.items():
        if group["algorithm"] == "adamw":
            err = float((params[name] - saved[name]).detach().norm() / saved[name].detach().norm())
            assert err < 1e-6, (name, err)


def test_option_is_validated_at_parse_time(capsys):
    from test_config import parse

    assert parse("--optimizer.on_routing_change", "convert").optimizer.on_routing_change == "convert"
    with pytest.raises(SystemExit):
        parse("--optimizer.on_routing_change", "keep")
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert "[optimizer] on_routing_change: must be one of ['refuse', 'reset', 'convert']" in err, err
