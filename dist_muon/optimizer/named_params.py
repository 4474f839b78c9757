"""What ``DistMuon(params)`` accepts, as torch.optim does: tensors, ``named_parameters()`` pairs or
param-group dicts (whose ``params`` may be named too), turned into groups with ``param_names``.

Named input gets the same groups and names as ``dm.build_param_groups`` (canonical FQNs): a
``named_parameters()`` list is routed by ``routing.route_named_parameters``, and a group dict of
``(name, tensor)`` pairs is that group with ``param_names``. Names are all-or-nothing, as in torch.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping

import torch

from ..routing import canonical_fqn, route_named_parameters

# torch.optim's own message for the same mistake, so code written against torch reads the same text.
_MIXED = "all optimizer params should be with/without names. Some param names are missing"


def _is_named(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


def _check_all_or_none(items: list, where: str) -> bool:
    """Whether ``items`` are named; ValueError when only some are."""
    named = [_is_named(x) for x in items]
    if any(named) and not all(named):
        first = next(i for i, n in enumerate(named) if not n)
        raise ValueError(f"{_MIXED} ({where}: item {first} is {type(items[first]).__name__}, not a (name, tensor) "
                         "pair): pass model.named_parameters() whole, or tensors only")
    return bool(named) and all(named)


def split_names(group: Mapping[str, Any], where: str) -> dict:
    """A group dict whose ``params`` are ``(name, tensor)`` pairs as ``params`` + ``param_names``."""
    out = dict(group)
    params = out.get("params")
    if params is None or isinstance(params, torch.Tensor):
        return out
    if isinstance(params, set):
        raise TypeError(f"{where}: params must be an ordered collection (a list), not a set: the order of a set "
                        "changes between runs")
    items = list(params)
    if not _check_all_or_none(items, where):
        out["params"] = items
        return out
    names = [canonical_fqn(n) for n, _ in items]
    given = out.get("param_names")
    if given is not None and list(given) != names:
        raise ValueError(f"{where}: param_names {list(given)} differ from the names of its (name, tensor) params "
                         f"{names}; give one of them")
    out["params"], out["param_names"] = [p for _, p in items], names
    return out


def split_by_ndim(params: list[torch.Tensor]) -> list[dict]:
    """Unnamed tensors without their modules: ndim >= 2 to Muon, the rest to AdamW."""
    warnings.warn(
        "DistMuon got parameters without their modules: ndim >= 2 go to Muon, the rest to AdamW. Embeddings and "
        "the output head cannot be recognised this way; pass dm.build_param_groups(model) instead.",
        stacklevel=4,
    )
    groups = []
    for algorithm, is_matrix in (("muon", True), ("adamw", False)):
        chosen = [p for p in params if (p.ndim >= 2) == is_matrix]
        if chosen:
            groups.append({"params": chosen, "algorithm": algorithm})
    return groups


def route_named(named: list[tuple[str, torch.Tensor]]) -> list[dict]:
    """A ``named_parameters()`` list: ``build_param_groups``'s routing by name and shape."""
    warnings.warn(
        "DistMuon got named parameters without their modules: routed as dm.build_param_groups routes them by name "
        "and shape (ndim < 2, skip_orthogonalization and a head named output/lm_head to AdamW). Embeddings and conv "
        "weights cannot be recognised this way; pass dm.build_param_groups(model) instead.",
        stacklevel=4,
    )
    return route_named_parameters(named)


def normalize_param_groups(params: Iterable) -> list[dict]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of Tensors or dicts, got a single Tensor")
    if isinstance(params, set):
        raise TypeError("params must be an ordered collection (a list), not a set: the order of a set changes "
                        "between runs")
    items = list(params)
    if not items:
        raise ValueError("DistMuon got an empty parameter list")
    if all(isinstance(x, Mapping) for x in items):
        return [dict(g) for g in items]
    if any(isinstance(x, Mapping) for x in items):
        raise TypeError("params must be all Tensors or all param-group dicts, not a mix")
    if _check_all_or_none(items, "params"):
        return route_named(items)
    return split_by_ndim(items)
