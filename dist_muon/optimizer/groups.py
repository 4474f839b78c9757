"""Completing and validating param groups: every group says its algorithm and all its hyperparameters."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..numerics import NSKey, check_ns_dtype, resolve_ns_dtype, resolve_schedule
from ..routing import ALGORITHMS, BLOCK_ADAMW_KEYS, VIEW_KEYS, check_floating_point, check_group_keys, view_options
from ..views import ADJUST_LR, MatrixView, build_view
from .group_keys import check_lr, translate_constructor_keys
from .named_params import split_names
from .state_dtype import check_state_dtype

MATRIX_ALGORITHMS = ("muon", "muown", "normuon")
# View keys every matrix group carries, so every checkpoint has them. Keys added later (interleave)
# are in a group only when set: DCP refuses to load a key a checkpoint lacks, so checkpoints written
# before such a key existed still load (an absent view option means "not set").
ALWAYS_SAVED_VIEW_KEYS = ("num_experts", "split_sizes", "num_heads", "flatten")
NONFINITE_POLICIES = ("raise", "skip")


def group_label(group: Mapping[str, Any], index: int) -> str:
    names = group.get("param_names") or []
    return f"param group {index} ({names[0]}{', …' if len(names) > 1 else ''})" if names else f"param group {index}"


def _check_number(label: str, key: str, value, low: float, high: float = math.inf, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{label}: {key} must be a number in {bound}, got {value!r}")


def _check_betas(label: str, betas) -> tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError) as e:
        raise ValueError(f"{label}: betas must be a pair (beta1, beta2), got {betas!r}") from e
    _check_number(label, "betas[0]", b1, 0.0, 1.0, high_open=True)
    _check_number(label, "betas[1]", b2, 0.0, 1.0, high_open=True)
    return (float(b1), float(b2))


def complete_group(group: Mapping[str, Any], index: int, defaults: Mapping[str, Any]) -> dict:
    """Fill an algorithm's defaults into ``group`` and validate every value; errors name the group."""
    check_group_keys(group, f"param group {index}")
    if "params" not in group:
        raise ValueError(f"param group {index} has no 'params'")
    out = split_names(group, f"param group {index}")
    params = out["params"]
    out["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
    names = out.get("param_names")
    if names is not None and len(names) != len(out["params"]):
        raise ValueError(f"param group {index}: {len(names)} param_names for {len(out['params'])} params")
    label = group_label(out, index)
    if out.get("algorithm") is None:
        out["algorithm"] = _infer_algorithm(out["params"], label)
    algorithm = out["algorithm"]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{label}: unknown algorithm {algorithm!r}; use one of {ALGORITHMS}")
    out = translate_constructor_keys(out, label)
    inherits_lr = "lr" not in out
    if algorithm == "adamw":
        for key in VIEW_KEYS:
            if out.get(key) not in (None, False):
                raise ValueError(f"{label}: view option {key!r} applies to muon/muown groups, not adamw")
        out.setdefault("lr", defaults["adamw_lr"])
        out.setdefault("betas", defaults["adamw_betas"])
        out.setdefault("eps", defaults["adamw_eps"])
        out.setdefault("weight_decay", defaults["adamw_weight_decay"])
    else:
        for key in ("lr", "momentum", "nesterov", "weight_decay", "ns_method", "ns_steps", "ns_dtype", "adjust_lr"):
            out.setdefault(key, defaults[key])
        if algorithm == "muown":
            out.setdefault("betas", defaults["adamw_betas"])
            out.setdefault("eps", defaults["adamw_eps"])
        if algorithm == "normuon":
            out.setdefault("beta2", defaults["normuon_beta2"])
            out.setdefault("eps", defaults["normuon_eps"])
        for key in VIEW_KEYS:
            if key in ALWAYS_SAVED_VIEW_KEYS:
                out.setdefault(key, False if key == "flatten" else None)
            elif out.get(key) is None:
                out.pop(key, None)
    if inherits_lr and isinstance(out["lr"], torch.Tensor):
        # A tensor default becomes each group's own: schedulers fill_ every group's lr in place, and
        # one shared tensor would give every group the last group's value.
        out["lr"] = out["lr"].detach().clone()
    # Kept only when set: a checkpoint written before the key existed must still load (as interleave).
    state_dtype = check_state_dtype(out.get("state_dtype", defaults.get("state_dtype")), label)
    if state_dtype is None:
        out.pop("state_dtype", None)
    else:
        out["state_dtype"] = state_dtype
    validate_hyperparameters(out, label)
    _complete_blocks(out, label, defaults)
    for i, p in enumerate(out["params"]):
        name = (names or [None] * len(out["params"]))[i] or f"{label} param {i}"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(p).__name__}")
        if p.is_complex():
            raise ValueError(f"{name}: complex parameters are not supported by DistMuon (as in torch.optim.Muon): "
                             "keep the real and imaginary parts as real parameters, or optimize it with torch.optim; "
                             "see docs/torch_optim.md")
        check_floating_point(name, p)
        if algorithm in MATRIX_ALGORITHMS:
            view_of(out, p, name)
    return out


def _infer_algorithm(params: list[torch.Tensor], label: str) -> str:
    if all(p.ndim >= 2 for p in params):
        return "muon"
    if all(p.ndim < 2 for p in params):
        return "adamw"
    raise ValueError(f"{label} mixes matrices and vectors without an 'algorithm'; set algorithm or split the group")


def validate_hyperparameters(group: dict, label: str) -> None:
    fix = ("give the group an lr or pass DistMuon(adamw_lr=...) or DistMuon(lr=...)" if group["algorithm"] == "adamw"
           else "give the group an lr or pass DistMuon(lr=...)")
    check_lr(label, group["lr"], fix=fix)
    _check_number(label, "weight_decay", group["weight_decay"], 0.0)
    if "betas" in group:
        group["betas"] = _check_betas(label, group["betas"])
    if "beta2" in group:
        _check_number(label, "beta2", group["beta2"], 0.0, 1.0, high_open=True)
    if "eps" in group:
        _check_number(label, "eps", group["eps"], 0.0)
    if group["algorithm"] in MATRIX_ALGORITHMS:
        _check_number(label, "momentum", group["momentum"], 0.0, 1.0, high_open=True)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"{label}: nesterov must be True or False, got {group['nesterov']!r}")
        if group["adjust_lr"] not in ADJUST_LR:
            raise ValueError(f"{label}: adjust_lr must be one of {ADJUST_LR}, got {group['adjust_lr']!r}")
        try:
            resolve_schedule(group["ns_method"], group["ns_steps"])
            group["ns_dtype"] = check_ns_dtype(group["ns_dtype"])
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None


def view_of(group: Mapping[str, Any], param: torch.Tensor, name: str) -> MatrixView:
    # Only None means "not set": a 0 (or False) given for a count is refused by build_view, not ignored.
    return build_view(tuple(param.shape), name=name, **view_options(group, name))


def has_adamw_blocks(group: Mapping[str, Any]) -> bool:
    """A muon group some of whose split_sizes blocks are AdamW rows (``block_algorithms``)."""
    return "adamw" in (group.get("block_algorithms") or ())


def _complete_blocks(out: dict, label: str, defaults: Mapping[str, Any]) -> None:
    """block_algorithms as a tuple (muon groups only); the AdamW blocks' hyperparameters filled in."""
    blocks = out.get("block_algorithms")
    if blocks is not None:
        if out["algorithm"] != "muon":
            raise ValueError(f"{label}: block_algorithms needs algorithm 'muon' (its blocks are 'muon' or 'adamw'), "
                             f"got {out['algorithm']!r}")
        if isinstance(blocks, str):
            raise ValueError(f"{label}: block_algorithms must be a list, one algorithm per split_sizes block, "
                             f"got {blocks!r}")
        out["block_algorithms"] = tuple(blocks)
    given = [k for k in BLOCK_ADAMW_KEYS if k in out]
    if not has_adamw_blocks(out):
        if given:
            raise ValueError(f"{label}: {given[0]} applies to the 'adamw' blocks of block_algorithms and this group "
                             "has none; set lr/betas/eps/weight_decay on an 'adamw' group instead")
        return
    for key in BLOCK_ADAMW_KEYS:
        out.setdefault(key, defaults[key])
    _check_number(label, "adamw_lr", out["adamw_lr"], 0.0)
    _check_number(label, "adamw_weight_decay", out["adamw_weight_decay"], 0.0)
    _check_number(label, "adamw_eps", out["adamw_eps"], 0.0)
    out["adamw_betas"] = _check_betas(label, out["adamw_betas"])


def check_policy(nonfinite_grad: str) -> str:
    if nonfinite_grad not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite_grad must be one of {NONFINITE_POLICIES}, got {nonfinite_grad!r}")
    return nonfinite_grad


def ns_key(group: Mapping[str, Any], device) -> NSKey:
    """The group's Newton–Schulz compute dtype (``"auto"`` resolved for ``device``) and schedule."""
    return NSKey(resolve_ns_dtype(group["ns_dtype"], device), resolve_schedule(group["ns_method"], group["ns_steps"]))
