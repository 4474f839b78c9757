"""An independent fp64 re-implementation of the update rule (docs/update_rule.md), for tests."""

from __future__ import annotations

import math

import torch

QUINTIC = [(3.4445, -4.7750, 2.0315)] * 5
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
SCHEDULES = {"quintic": (QUINTIC, 1.0, 1e-7), "polar_express": (POLAR_EXPRESS, 1.02, 1e-6)}


def ns64(U: torch.Tensor, method: str) -> torch.Tensor:
    coefficients, norm_scale, eps = SCHEDULES[method]
    X = U.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() * norm_scale + eps)
    for a, b, c in coefficients:
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if tall else X


def scale(m: int, n: int, adjust_lr) -> float:
    return {"original": math.sqrt(max(1, m / n)), "match_rms_adamw": 0.2 * math.sqrt(max(m, n)), None: 1.0}[adjust_lr]


def muon_step64(p, g, buf, *, lr, momentum, nesterov, weight_decay, method, adjust_lr, matrices):
    """One step on fp64 copies. ``matrices(t)`` yields (index, matrix view) pairs of a tensor."""
    buf = buf.double().lerp(g.double(), 1 - momentum)
    u = g.double().lerp(buf, momentum) if nesterov else buf
    p = p.double() * (1 - lr * weight_decay)
    update = torch.zeros_like(p)
    for index, U in matrices(u):
        m, n = U.shape
        update[index] = (scale(m, n, adjust_lr) * ns64(U, method)).reshape(update[index].shape)
    return p - lr * update, buf
