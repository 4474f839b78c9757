"""``cuda_graph=True``: the graphed step equals the eager step, with live lr / weight decay and
parameters that miss a gradient masked. On CPU the graphed code runs eagerly (nothing to
capture), so the static buffers, the live-value vector and the masks are checked anywhere; the
CUDA variants (skipped without a GPU) check the captured, replayed graph itself."""

import copy

import pytest
import torch
from torch import nn

import dist_muon as dm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device):
    torch.manual_seed(3)
    model = nn.Module()
    model.a = nn.Parameter(torch.randn(12, 16))
    model.b = nn.Parameter(torch.randn(4, 6, 8))
    model.c = nn.Parameter(torch.randn(16, 12))
    model.bias = nn.Parameter(torch.randn(12))
    return model.to(device)


def _optimizer(model, cuda_graph):
    groups = [
        {"params": [model.a, model.b], "param_names": ["a", "b"], "algorithm": "muon"},
        {"params": [model.c], "param_names": ["c"], "algorithm": "normuon", "lr": 0.03},
        {"params": [model.bias], "param_names": ["bias"], "algorithm": "adamw"},
    ]
    opt = dm.DistMuon(groups, lr=0.05, weight_decay=0.1, ns_dtype=torch.float32, bucket_bytes=2048,
                      cuda_graph=cuda_graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return opt, sched


def _run(device, cuda_graph, steps=5, starve=("b", 2)):
    """``steps`` steps with a scheduler; parameter ``starve[0]`` has no gradient at step ``starve[1]``."""
    model = _model(device)
    opt, sched = _optimizer(model, cuda_graph)
    history = []
    for step in range(steps):
        for name, p in model.named_parameters():
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + len(name)))
            p.grad = None if (name, step) == starve else g.to(device)
        before = {n: (p.detach().clone(), opt.state[p].get("momentum_buffer", torch.zeros(())).clone())
                  for n, p in model.named_parameters()}
        opt.step()
        sched.step()
        history.append(before)
    return model, opt, history


@pytest.mark.parametrize("device", DEVICES)
def test_graphed_step_equals_the_eager_step_with_a_scheduler(device):
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    graphed, opt_g, _ = _run(device, True)
    eager, opt_e, _ = _run(device, False)
    if device == "cuda":
        assert opt_g._graphed.graph is not None, "the step was not captured"
    for (name, g), e in zip(graphed.named_parameters(), eager.parameters()):
        assert torch.allclose(g.detach(), e.detach(), rtol=1e-5, atol=1e-6), name
        for key, value in opt_g.state[g].items():
            assert torch.allclose(value, opt_e.state[e][key], rtol=1e-5, atol=1e-6), (name, key)


@pytest.mark.parametrize("device", DEVICES)
def test_a_parameter_without_gradient_keeps_value_and_momentum_in_the_graphed_step(device):
    model, opt, history = _run(device, True, steps=4, starve=("b", 3))
    value, momentum = history[3]["b"]
    assert torch.equal(model.b.detach(), value) and torch.equal(opt.state[model.b]["momentum_buffer"], momentum)
    assert not torch.equal(model.a.detach(), history[3]["a"][0])  # the others did move


def test_graphed_step_refuses_muown_naming_the_group():
    W = nn.Parameter(torch.randn(6, 8))
    with pytest.raises(ValueError, match="Muown"):
        dm.DistMuon([{"params": [W], "param_names": ["w"], "algorithm": "muown"}], lr=0.02, cuda_graph=True)


def test_graphed_step_resumes_from_a_state_dict():
    model, opt, _ = _run("cpu", True, steps=2)
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    twin = _model("cpu")
    twin.load_state_dict(model.state_dict())
    opt2, _ = _optimizer(twin, True)
    opt2.load_state_dict(saved)
    for m, o in ((model, opt), (twin, opt2)):
        for i, p in enumerate(m.parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
