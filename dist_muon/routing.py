"""Which algorithm each parameter gets, as torch-style param groups, and the routing report."""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .views import build_view, lr_scale

ALGORITHMS = ("muon", "adamw", "muown", "normuon")
VIEW_KEYS = ("num_experts", "split_sizes", "num_heads", "flatten")
MATRIX_HYPERPARAMETERS = ("momentum", "nesterov", "ns_method", "ns_steps", "ns_dtype", "adjust_lr")
ADAMW_HYPERPARAMETERS = ("betas", "eps")
NORMUON_HYPERPARAMETERS = ("beta2",)  # and eps
HYPERPARAMETERS = ("lr", "weight_decay") + MATRIX_HYPERPARAMETERS + ADAMW_HYPERPARAMETERS + NORMUON_HYPERPARAMETERS
GROUP_KEYS = ("params", "param_names", "algorithm") + VIEW_KEYS + HYPERPARAMETERS

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
_HEAD_NAMES = ("output", "lm_head")

Rule = tuple[str, Mapping[str, Any]]


def canonical_fqn(name: str) -> str:
    """The FQN a user (and a checkpoint) knows, without activation-checkpoint/compile/FSDP1 wrappers."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def check_group_keys(options: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(options) - set(GROUP_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known options are {list(GROUP_KEYS)}")
    algorithm = options.get("algorithm")
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f"{where}: unknown algorithm {algorithm!r}; use one of {ALGORITHMS}")


def _vocabulary_head(model: nn.Module) -> Optional[nn.Module]:
    """The last Linear projecting onto an embedding's vocabulary (a hidden Linear that merely has
    the vocabulary's width is not the last one)."""
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears and linears[-1].out_features in vocab_sizes else None


def default_algorithm(name: str, param: torch.Tensor, module: nn.Module, head: Optional[nn.Module],
                      matrix_algorithm: str = "muon") -> str:
    """Embeddings, the vocabulary head, non-matrices and tagged parameters go to AdamW; other
    matrices to ``matrix_algorithm``."""
    if param.ndim < 2 or getattr(param, "skip_orthogonalization", False):
        return "adamw"
    if isinstance(module, nn.Embedding) or module is head:
        return "adamw"
    module_name = name.rpartition(".")[0]
    return "adamw" if module_name.rpartition(".")[2] in _HEAD_NAMES else matrix_algorithm


def _owning_modules(model: nn.Module) -> dict[int, nn.Module]:
    """id(param) -> the first module (in module order) that registers it; tied weights keep the embedding."""
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), module)
    return owners


def _match_rule(name: str, rules: Sequence[Rule]) -> Mapping[str, Any]:
    for pattern, options in rules:
        if re.search(pattern, name):
            return options
    return {}


def build_param_groups(model: nn.Module, *, rules: Sequence[Rule] = (), matrix_algorithm: str = "muon",
                       **overrides) -> list[dict]:
    """Route every trainable parameter of ``model`` and return torch-style param groups.

    ``rules`` are ``(regex, options)`` pairs matched with ``re.search`` against the canonical
    FQN, first match wins; options may set ``algorithm``, view options and hyperparameters.
    Matrices no rule routes get ``matrix_algorithm`` ("muon", "normuon" or "muown").
    ``overrides`` are hyperparameters set on every group (a rule's own value wins).
    Parameters with identical options share a group; group order follows parameter order.
    """
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], Mapping)):
            raise ValueError(f"rules[{i}] must be a (regex, options_dict) pair, got {rule!r}")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"rules[{i}]: invalid regex {rule[0]!r}: {e}") from e
        check_group_keys(rule[1], f"rules[{i}] ({rule[0]!r})")
    check_group_keys(overrides, "build_param_groups overrides")
    if matrix_algorithm not in ALGORITHMS or matrix_algorithm == "adamw":
        raise ValueError(f"matrix_algorithm must be one of {[a for a in ALGORITHMS if a != 'adamw']}, "
                         f"got {matrix_algorithm!r}")
    if "params" in overrides or "param_names" in overrides:
        raise ValueError("build_param_groups overrides cannot set 'params' or 'param_names'")

    owners = _owning_modules(model)
    head = _vocabulary_head(model)
    groups: dict[tuple, dict] = {}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = canonical_fqn(raw_name)
        options = {**overrides, **_match_rule(name, rules)}
        options.setdefault("algorithm", default_algorithm(name, param, owners[id(param)], head, matrix_algorithm))
        if options["algorithm"] == "adamw":
            options = {k: v for k, v in options.items() if k not in VIEW_KEYS}
        key = tuple(sorted((k, _hashable(v)) for k, v in options.items()))
        group = groups.setdefault(key, {"params": [], "param_names": [], **options})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value if isinstance(value, (int, float, str, bool, type(None), torch.dtype)) else repr(value)


def routing_rows(groups: Iterable[Mapping[str, Any]], default_adjust_lr: Optional[str] = "original") -> list[dict]:
    """One row per parameter: FQN, shape, algorithm, matrices and lr scale."""
    rows = []
    for gi, group in enumerate(groups):
        names = group.get("param_names") or [f"group{gi}.param{i}" for i in range(len(group["params"]))]
        algorithm = group.get("algorithm", "muon")
        for name, p in zip(names, group["params"]):
            shape = tuple(p.shape)
            row = {"fqn": name, "shape": shape, "algorithm": algorithm, "matrices": "-", "lr_scale": "-"}
            if algorithm != "adamw":
                view = build_view(shape, name=name, **{k: group[k] for k in VIEW_KEYS if group.get(k) is not None})
                adjust = group.get("adjust_lr", default_adjust_lr)
                scales = sorted({round(lr_scale(m, n, adjust), 4) for m, n in view.matrix_shapes})
                row["matrices"] = view.describe()
                row["lr_scale"] = "/".join(f"{s:g}" for s in scales)
            rows.append(row)
    return rows


def routing_report(groups_or_optimizer, default_adjust_lr: Optional[str] = "original") -> str:
    """A readable table of where every parameter goes; print it before launching."""
    groups = getattr(groups_or_optimizer, "param_groups", groups_or_optimizer)
    rows = routing_rows(groups, default_adjust_lr)
    header = {"fqn": "parameter", "shape": "shape", "algorithm": "algorithm", "matrices": "matrices", "lr_scale": "lr scale"}
    table = [header] + [{k: str(v) for k, v in r.items()} for r in rows]
    widths = {k: max(len(str(r[k])) for r in table) for k in header}
    lines = ["  ".join(str(r[k]).ljust(widths[k]) for k in header).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * widths[k] for k in header))
    counts = {a: sum(r["algorithm"] == a for r in rows) for a in ALGORITHMS}
    lines.append(", ".join(f"{n} {a}" for a, n in counts.items() if n))
    return "\n".join(lines)
