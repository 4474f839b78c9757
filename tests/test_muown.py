"""Muown against the authors' formulation (Lion et al., kcc-lion/muown), written out independently here."""

import pytest
import torch
from torch import nn

import dist_muon as dm
from reference import ns64, scale


def muown_reference(W, grads, *, lr, momentum, nesterov, betas, eps, weight_decay, method):
    """The reference loop: heavy-ball momentum on grad_v, Adam on g, W = g·v/‖v‖, decoupled decay on W.

    Returns W after every step."""
    W = W.double().clone()
    g = W.norm(dim=1, keepdim=True)
    v_norm = g.clone()
    m_v = torch.zeros_like(W)
    m_g, v_g = torch.zeros_like(g), torch.zeros_like(g)
    trajectory = []
    for step, grad in enumerate(grads, start=1):
        grad = grad.double()
        W_old = W.clone()
        u = W / g
        v = u * v_norm
        grad_g = (grad * u).sum(dim=1, keepdim=True)
        grad_v = (g / v_norm) * (grad - u * grad_g)
        m_v = momentum * m_v + grad_v
        update = grad_v + momentum * m_v if nesterov else m_v
        v_new = v - lr * scale(*W.shape, "match_rms_adamw") * ns64(update, method)
        m_g = betas[0] * m_g + (1 - betas[0]) * grad_g
        v_g = betas[1] * v_g + (1 - betas[1]) * grad_g**2
        g = g - lr * (m_g / (1 - betas[0] ** step)) / ((v_g / (1 - betas[1] ** step)).sqrt() + eps)
        v_norm = v_new.norm(dim=1, keepdim=True)
        W = g * v_new / v_norm
        if weight_decay:
            W = W - lr * weight_decay * W_old
            g = W.norm(dim=1, keepdim=True)
        trajectory.append(W)
    return trajectory


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muown_matches_reference_formulation(nesterov, weight_decay):
    gen = torch.Generator().manual_seed(0)
    W = nn.Parameter(torch.randn(12, 20, generator=gen))
    grads = [torch.randn(12, 20, generator=gen) for _ in range(4)]
    hyper = dict(lr=0.02, momentum=0.9, nesterov=nesterov, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    expected = muown_reference(W.detach(), grads, method="polar_express", **hyper)
    opt = dm.DistMuon([{"params": [W], "algorithm": "muown", "betas": hyper["betas"], "eps": hyper["eps"]}],
                      lr=hyper["lr"], momentum=hyper["momentum"], nesterov=nesterov, weight_decay=weight_decay,
                      adjust_lr="match_rms_adamw", ns_dtype=torch.float32)
    ours, theirs = W.detach().double().clone(), W.detach().double().clone()
    for step, (grad, target) in enumerate(zip(grads, expected)):
        W.grad = grad.clone()
        opt.step()
        # Each step's update against the reference's. The weight moves by ~0.6% of its norm per step,
        # so comparing weights would hide errors ~200x. fp32 floor: W is recomposed as g·v/‖v‖, so its
        # fp32 rounding (~6e-8 of ‖W‖) is ~1e-5 of the update, plus ~4e-6 from fp32 NS; measured <= 2e-5.
        update, reference_update = W.detach().double() - ours, target - theirs
        assert (update - reference_update).norm() / reference_update.norm() < 5e-5, step
        ours, theirs = W.detach().double().clone(), target
    torch.testing.assert_close(opt.state[W]["magnitude"].double(), W.detach().double().norm(dim=1, keepdim=True),
                               rtol=1e-5, atol=1e-6)


def test_muown_zero_rows_never_nan():
    W = nn.Parameter(torch.randn(6, 10))
    with torch.no_grad():
        W[2].zero_()
    opt = dm.DistMuon([{"params": [W], "algorithm": "muown"}], lr=0.02, weight_decay=0.1)
    for _ in range(3):
        W.grad = torch.randn_like(W)
        W.grad[4].zero_()
        opt.step()
    assert torch.isfinite(W).all()
    assert all(torch.isfinite(t).all() for t in opt.state[W].values() if isinstance(t, torch.Tensor))


def test_muown_on_experts_keeps_per_row_magnitudes():
    W = nn.Parameter(torch.randn(3, 4, 8))
    opt = dm.DistMuon([{"params": [W], "algorithm": "muown"}], lr=0.02, ns_dtype=torch.float32)
    assert opt.state[W]["magnitude"].shape == (3, 4, 1)
    W.grad = torch.randn_like(W)
    opt.step()
    torch.testing.assert_close(opt.state[W]["magnitude"], W.detach().norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)
