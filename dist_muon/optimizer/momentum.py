"""Muon's update before orthogonalization, for one param group, as foreach ops on local tensors."""

from __future__ import annotations

from typing import Sequence, Union

import torch

Decay = Union[float, Sequence[torch.Tensor]]


def in_dtypes_of(grads: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient in its partner's dtype (bf16 gradients of fp32 parameters): lerp needs one dtype."""
    return [g if g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads, like)]


def momentum_(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], momentum: float,
              nesterov: bool, decay: Decay) -> list[torch.Tensor]:
    """``buf ← buf.lerp(g, 1 − μ)``; ``p ← p · decay``; the NS input: ``g.lerp(buf, μ)`` (formed in the
    gradient's storage) with Nesterov, else ``buf``.

    ``decay`` is ``1 − lr·wd`` (skipped when exactly 1), or one 0-dim device tensor per parameter
    (live values for a captured graph).
    """
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    if not isinstance(decay, float) or decay != 1.0:
        torch._foreach_mul_(params, decay)
    if nesterov:
        torch._foreach_lerp_(grads, bufs, momentum)
        return grads
    return bufs
