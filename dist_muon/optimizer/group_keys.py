"""Group keys named like DistMuon's arguments, and learning rates given per group or as tensors.

torch.optim lets every constructor hyperparameter be overridden per group. DistMuon's ``adamw_*``
and ``normuon_*`` arguments are defaults of one algorithm's groups, so in a group they become that
group's own key (``adamw_betas`` in an AdamW group is its ``betas``); where they mean nothing the
error names the key to use. A learning rate may be given only per group, and may be a 1-element
tensor (as in torch.optim): the step reads its current value, so schedulers that ``fill_`` it and
code that changes it in place drive the step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from ..routing import BLOCK_ADAMW_KEYS, CONSTRUCTOR_GROUP_KEYS, MATRIX_HYPERPARAMETERS

# The keys each algorithm's groups read (besides params, names, algorithm and view options).
OWN_KEYS = {
    "muon": ("lr", "weight_decay") + MATRIX_HYPERPARAMETERS,
    "normuon": ("lr", "weight_decay") + MATRIX_HYPERPARAMETERS + ("beta2", "eps"),
    "muown": ("lr", "weight_decay") + MATRIX_HYPERPARAMETERS + ("betas", "eps"),
    "adamw": ("lr", "betas", "eps", "weight_decay"),
}


def translate_constructor_keys(group: Mapping[str, Any], label: str) -> dict:
    """``group`` with every constructor-named key turned into the group's own key, or ValueError
    naming the key to use (``group["algorithm"]`` is known)."""
    algorithm = group["algorithm"]
    out = dict(group)
    # a group with block_algorithms keeps adamw_* as its AdamW blocks' own keys (groups._complete_blocks)
    kept = BLOCK_ADAMW_KEYS if group.get("block_algorithms") is not None else ()
    for key in [k for k in group if k in CONSTRUCTOR_GROUP_KEYS and k not in kept]:
        value = out.pop(key)
        own = CONSTRUCTOR_GROUP_KEYS[key].get(algorithm)
        if own is None:
            raise ValueError(f"{label}: {key!r} means nothing in a {algorithm} group (it is the default of "
                             f"{_targets(key)} groups); {_instead(key, algorithm)}")
        if own in out and not _same(out[own], value):
            raise ValueError(f"{label}: {key}={value!r} and {own}={out[own]!r} set the same value; give one of them")
        out[own] = value
    return out


def _targets(key: str) -> str:
    return "/".join(CONSTRUCTOR_GROUP_KEYS[key])


def _instead(key: str, algorithm: str) -> str:
    """The key that says in an ``algorithm`` group what ``key`` says elsewhere."""
    base = key.split("_", 1)[1]
    if base in OWN_KEYS[algorithm]:
        return f"use {base!r} (this group's own {base})"
    target = next(iter(CONSTRUCTOR_GROUP_KEYS[key]))
    article = "an" if algorithm[0] in "aeiou" else "a"
    return f"{article} {algorithm} group has no {base}: set algorithm={target!r} and use {base!r}, or drop {key!r}"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def check_lr(label: str, lr, key: str = "lr", fix: str = "") -> None:
    """A finite number >= 0, or a 1-element floating tensor holding one (torch.optim's tensor lr)."""
    if lr is None:
        raise ValueError(f"{label}: no {key}: {fix or 'give the group an lr or pass DistMuon(lr=...)'}")
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point() or lr.requires_grad:
            raise ValueError(f"{label}: a tensor {key} must be a 1-element floating-point tensor without grad "
                             f"(e.g. torch.tensor(0.02)), got shape {tuple(lr.shape)}, {lr.dtype}")
        value = float(lr)  # at construction only; the step reads all tensor lrs at once
    else:
        value = lr
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ValueError(f"{label}: {key} must be a number in [0.0, inf] or a 1-element tensor, got {lr!r}")


def current_lrs(groups: Sequence[Mapping[str, Any]]) -> list[float]:
    """Every group's lr as a float, tensors read now: CPU tensors without a device sync, tensors on
    an accelerator with one read per device (none when no lr is such a tensor)."""
    lrs = [g["lr"] for g in groups]
    on_device: dict[torch.device, list[int]] = {}
    out = []
    for i, lr in enumerate(lrs):
        if not isinstance(lr, torch.Tensor):
            out.append(lr)
            continue
        out.append(None)
        if lr.device.type == "cpu":
            out[i] = lr.item()
        else:
            on_device.setdefault(lr.device, []).append(i)
    for members in on_device.values():
        values = torch.stack([lrs[i].detach().reshape(()).double() for i in members]).tolist()
        for i, v in zip(members, values):
            out[i] = v
    return out
