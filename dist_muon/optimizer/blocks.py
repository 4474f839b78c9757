"""Fused parameters whose row blocks get different algorithms (``block_algorithms``).

A GatedDeltaNet ``in_proj`` packs q, k, v, conv, gate and beta rows into one weight. With
``{"split_sizes": (q, k, v, c, g, b), "block_algorithms": ("muon",) * 3 + ("adamw",) * 3}``
the Muon blocks are the view's matrices (each orthogonalized whole by the plan, with its own
lr scale) and the AdamW blocks are rows the view leaves out (``MatrixView.excluded_rows``),
updated elementwise by ``torch.optim.AdamW``'s functional on views of exactly those rows.

The state is one tensor per key over the whole parameter (momentum for the Muon rows, AdamW's
moments for the others; the rows of the other algorithm stay zero), laid out like the parameter,
so DCP saves and reshards it like any other state. Every rank finds its local rows of each kind
from the parameter's layout, so blocks may straddle FSDP / TP shard boundaries anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .. import comm
from ..layout import Layout
from ..views import MatrixView
from .state_dtype import WORK_DTYPE, Decay, Scratch, group_adamw_, group_momentum_, rounds

Runs = tuple[tuple[int, int], ...]  # [start, stop) along one dim of a local tensor


@dataclass(frozen=True)
class LocalRows:
    """One rank's rows of a mixed parameter, as runs along ``dim`` of its local shard."""

    dim: int
    adamw: Runs
    muon: Runs


def _merged(runs) -> Runs:
    out: list[list[int]] = []
    for a, b in sorted(runs):
        if out and out[-1][1] >= a:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def local_rows(view: MatrixView, layout: Layout, rank: int) -> LocalRows:
    """Intersect the view's excluded (AdamW) rows with the global rows ``rank`` holds along the row dim."""
    runs = layout.runs[rank]
    if runs is None:
        return LocalRows(view.row_dim, (), ())
    held = runs[view.row_dim]
    adamw = _merged((local + lo - start, local + hi - start)
                    for local, start, length in held for a, b in view.excluded_rows
                    for lo, hi in ((max(a, start), min(b, start + length)),) if lo < hi)
    size = sum(length for _, _, length in held)
    edges = [0, *(x for run in adamw for x in run), size]
    muon = tuple((a, b) for a, b in zip(edges[::2], edges[1::2]) if a < b)
    return LocalRows(view.row_dim, adamw, muon)


def _narrowed(t: torch.Tensor, dim: int, runs: Runs) -> list[torch.Tensor]:
    return [t.narrow(dim, a, b - a) for a, b in runs]


def blocks_lr(group: Mapping[str, Any]) -> float:
    """The AdamW blocks' lr: ``adamw_lr``, following the group's lr schedule (× lr / initial_lr, the
    factor torch's LR schedulers apply to the group's own lr)."""
    initial = group.get("initial_lr")
    return group["adamw_lr"] * (group["lr"] / initial) if initial else group["adamw_lr"]


def mixed_step_(group: Mapping[str, Any], params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                states: Sequence[Mapping[str, torch.Tensor]], rows: Sequence[LocalRows], decay: Decay,
                scratch: Scratch) -> list[torch.Tensor]:
    """One step of a mixed group's members (local tensors): AdamW on the AdamW rows, then Muon's
    momentum and weight decay on the Muon rows. Returns each member's whole NS input (the plan
    reads only its Muon rows)."""
    local = lambda key: [comm.local_tensor(s[key]) for s in states]  # noqa: E731
    bufs, exp_avgs, exp_avg_sqs = local("momentum_buffer"), local("exp_avg"), local("exp_avg_sq")
    # AdamW rows. torch's AdamW counts steps per tensor it is given: each row view gets a copy of the
    # parameter's step and the parameter's own step advances once (also on ranks without such rows).
    views = [[], [], [], []]
    steps = []
    for p, g, m, v, s, r in zip(params, grads, exp_avgs, exp_avg_sqs, states, rows):
        for out, t in zip(views, (p, g, m, v)):
            out.extend(_narrowed(t, r.dim, r.adamw))
        steps.extend(s["step"].clone() for _ in r.adamw)
    beta1, beta2 = group["adamw_betas"]
    if views[0]:
        group_adamw_(*views, steps, scratch, beta1=beta1, beta2=beta2, lr=blocks_lr(group),
                     weight_decay=group["adamw_weight_decay"], eps=group["adamw_eps"])
    torch._foreach_add_([s["step"] for s in states], 1.0)
    # Muon rows: the gradient in the momentum's working dtype first, so that the NS input is whole.
    whole = []
    for p, g, b in zip(params, grads, bufs):
        work = WORK_DTYPE if rounds(b, p) else b.dtype
        whole.append(g if g.dtype == work else g.to(work))
    p_rows, g_rows, b_rows = [], [], []
    for p, g, b, r in zip(params, whole, bufs, rows):
        p_rows += _narrowed(p, r.dim, r.muon)
        g_rows += _narrowed(g, r.dim, r.muon)
        b_rows += _narrowed(b, r.dim, r.muon)
    if not isinstance(decay, float):
        raise TypeError("mixed blocks take a float weight-decay factor (the graphed step does not run them)")
    if b_rows:
        group_momentum_(p_rows, g_rows, b_rows, group["momentum"], group["nesterov"], decay, scratch)
    # Nesterov (and rounded state) form the NS input in the gradient's storage, else it is the momentum
    return [g if group["nesterov"] or rounds(b, p) else b for p, g, b in zip(params, whole, bufs)]
