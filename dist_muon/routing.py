"""Which algorithm each parameter gets, as torch-style param groups, and the routing report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .views import build_view, lr_scale

ALGORITHMS = ("muon", "adamw", "muown", "normuon")
VIEW_KEYS = ("num_experts", "split_sizes", "num_heads", "interleave", "flatten", "block_algorithms")
# One per split_sizes block of a muon group: Muon blocks are matrices, AdamW blocks elementwise rows.
BLOCK_ALGORITHMS = ("muon", "adamw")
# The AdamW blocks' hyperparameters (the optimizer's adamw_* unless the group sets them).
BLOCK_ADAMW_KEYS = ("adamw_lr", "adamw_betas", "adamw_eps", "adamw_weight_decay")
MATRIX_HYPERPARAMETERS = ("momentum", "nesterov", "ns_method", "ns_steps", "ns_dtype", "adjust_lr")
ADAMW_HYPERPARAMETERS = ("betas", "eps")
NORMUON_HYPERPARAMETERS = ("beta2",)  # and eps
HYPERPARAMETERS = ("lr", "weight_decay") + MATRIX_HYPERPARAMETERS + ADAMW_HYPERPARAMETERS + NORMUON_HYPERPARAMETERS
# DistMuon's constructor defaults of one algorithm's groups, accepted as group keys where they mean
# something: key -> {algorithm: the group's own key it sets}. Elsewhere DistMuon's error names the key to use.
CONSTRUCTOR_GROUP_KEYS = {
    "adamw_lr": {"adamw": "lr"},
    "adamw_betas": {"adamw": "betas", "muown": "betas"},
    "adamw_eps": {"adamw": "eps", "muown": "eps"},
    "adamw_weight_decay": {"adamw": "weight_decay"},
    "normuon_beta2": {"normuon": "beta2"},
    "normuon_eps": {"normuon": "eps"},
}
# DistMuon arguments that configure the whole optimizer, never one group.
OPTIMIZER_WIDE_KEYS = ("process_group", "owner_policy", "bucket_bytes", "nonfinite_grad", "compile_ns", "cuda_graph")
# torch.optim group keys with no DistMuon counterpart, and what to do instead.
_TORCH_OPTIM_KEYS = {
    "maximize": "minimise the negated objective instead",
    "foreach": "every step already runs foreach ops; drop the key",
    "fused": "every step already runs foreach ops; drop the key",
    "capturable": "DistMuon(cuda_graph=True) captures the step; drop the key",
    "differentiable": "the step is not differentiable; drop the key",
    "amsgrad": "AdamW groups follow torch.optim.AdamW without amsgrad; drop the key",
}
STATE_KEYS = ("state_dtype",)  # how the group's optimizer state is stored
# (BLOCK_ADAMW_KEYS are constructor keys too: in a muon group with AdamW blocks they stay the blocks' own)
GROUP_KEYS = (("params", "param_names", "algorithm") + VIEW_KEYS + HYPERPARAMETERS + STATE_KEYS
              + tuple(CONSTRUCTOR_GROUP_KEYS))

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
_HEAD_NAMES = ("output", "lm_head")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

Rule = tuple[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Route:
    """Where ``build_param_groups`` sent a parameter, and why (the routing report's ``reason``)."""

    algorithm: str
    reason: str


# Why each parameter got its algorithm, kept beside the groups: a reason is not a param-group key
# (DistMuon would save it in every checkpoint). Keyed by identity, weakly: the parameters own them.
_ROUTES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def canonical_fqn(name: str) -> str:
    """The FQN a user (and a checkpoint) knows, without activation-checkpoint/compile/FSDP1 wrappers."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def check_group_keys(options: Mapping[str, Any], where: str) -> None:
    wide = [k for k in OPTIMIZER_WIDE_KEYS if k in options]
    if wide:
        raise ValueError(f"{where}: {wide[0]!r} is an optimizer-wide setting, not a group key: pass "
                         f"DistMuon(..., {wide[0]}=...) instead")
    unknown = sorted(set(options) - set(GROUP_KEYS))
    torch_only = [k for k in unknown if k in _TORCH_OPTIM_KEYS]
    if torch_only:
        raise ValueError(f"{where}: {torch_only[0]!r} is a torch.optim option DistMuon does not have: "
                         f"{_TORCH_OPTIM_KEYS[torch_only[0]]} (docs/torch_optim.md)")
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known options are {list(GROUP_KEYS)}")
    algorithm = options.get("algorithm")
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f"{where}: unknown algorithm {algorithm!r}; use one of {ALGORITHMS}")


def view_options(group: Mapping[str, Any], name: str) -> dict:
    """``build_view`` keyword arguments of a group's view keys (block_algorithms become matrix_blocks)."""
    options = {k: group[k] for k in VIEW_KEYS if group.get(k) is not None}
    if "split_sizes" in options:
        options["split_sizes"] = tuple(options["split_sizes"])
    blocks = options.pop("block_algorithms", None)
    if blocks is not None:
        if isinstance(blocks, str) or not all(b in BLOCK_ALGORITHMS for b in blocks):
            raise ValueError(f"{name}: block_algorithms must be a list with one of {BLOCK_ALGORITHMS} per "
                             f"split_sizes block, got {blocks!r}")
        options["matrix_blocks"] = tuple(b == "muon" for b in blocks)
    return options


def _vocabulary_head(model: nn.Module) -> Optional[nn.Module]:
    """The last Linear projecting onto an embedding's vocabulary (a hidden Linear that merely has
    the vocabulary's width is not the last one)."""
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears and linears[-1].out_features in vocab_sizes else None


def check_floating_point(name: str, param: torch.Tensor) -> None:
    """Integer and bool tensors have no gradient step; refuse them by name instead of failing later."""
    if not param.dtype.is_floating_point and not param.dtype.is_complex:
        raise ValueError(f"{name}: dtype {param.dtype} is not a floating-point type; DistMuon optimizes "
                         "floating-point parameters only (freeze it with requires_grad=False or leave it out)")


def is_conv_weight(param: torch.Tensor, module: nn.Module) -> bool:
    """The weight (not the bias) of a Conv1d/2d/3d or a subclass."""
    return isinstance(module, _CONVS) and param is module.weight


def is_depthwise_conv(param: torch.Tensor, module: nn.Module) -> bool:
    """One input channel per group (``in_channels / groups == 1``): each filter sees one channel."""
    return is_conv_weight(param, module) and param.shape[1] == 1


def default_route(name: str, param: torch.Tensor, module: nn.Module, head: Optional[nn.Module],
                  matrix_algorithm: str = "muon") -> Route:
    """Embeddings, the vocabulary head, non-matrices, depthwise convs and tagged parameters go to
    AdamW; other matrices (conv weights flattened, see ``conv_view``) to ``matrix_algorithm``."""
    if param.ndim < 2:
        return Route("adamw", "ndim < 2")
    if getattr(param, "skip_orthogonalization", False):
        return Route("adamw", "skip_orthogonalization")
    if isinstance(module, nn.Embedding):
        return Route("adamw", "embedding")
    if (head is not None and module is head) or name.rpartition(".")[0].rpartition(".")[2] in _HEAD_NAMES:
        return Route("adamw", "output head")
    if is_depthwise_conv(param, module):
        return Route("adamw", "depthwise conv")
    if is_conv_weight(param, module):
        return Route(matrix_algorithm, "conv (flattened)")
    return Route(matrix_algorithm, "matrix")


def default_algorithm(name: str, param: torch.Tensor, module: nn.Module, head: Optional[nn.Module],
                      matrix_algorithm: str = "muon") -> str:
    return default_route(name, param, module, head, matrix_algorithm).algorithm


def conv_view(param: torch.Tensor, module: nn.Module, options: Mapping[str, Any]) -> dict:
    """A conv weight is one ``[out, in/groups · prod(kernel)]`` matrix (Keller Jordan's rule), never
    a stack of per-channel matrices: 3D (Conv1d) weights need ``flatten`` for that (4D/5D always
    flatten). Nothing when the options already give a view."""
    if is_conv_weight(param, module) and param.ndim == 3 and not any(options.get(k) not in (None, False) for k in VIEW_KEYS):
        return {"flatten": True}
    return {}


def _owning_modules(model: nn.Module) -> dict[int, nn.Module]:
    """id(param) -> the first module (in module order) that registers it; tied weights keep the embedding."""
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), module)
    return owners


def _match_rule(name: str, rules: Sequence[Rule]) -> tuple[Optional[int], Mapping[str, Any]]:
    """(index, options) of the first rule matching ``name``; (None, {}) when none does."""
    for i, (pattern, options) in enumerate(rules):
        if re.search(pattern, name):
            return i, options
    return None, {}


def _route(name: str, param: torch.Tensor, module: nn.Module, head: Optional[nn.Module], matrix_algorithm: str,
           rules: Sequence[Rule], overrides: Mapping[str, Any]) -> tuple[dict, Route]:
    """A parameter's group options and route: a rule's algorithm wins, then the overrides', then the default."""
    rule_index, rule = _match_rule(name, rules)
    if "algorithm" in rule:
        route = Route(rule["algorithm"], f"rules[{rule_index}]")
    elif "algorithm" in overrides:
        route = Route(overrides["algorithm"], "overrides")
    else:
        route = default_route(name, param, module, head, matrix_algorithm)
    # Overrides are set on every group, so one named like a DistMuon argument (adamw_betas, ...)
    # reaches only the groups it concerns, as the argument would; a rule's is kept (and checked).
    concerned = {k: v for k, v in overrides.items()
                 if k not in CONSTRUCTOR_GROUP_KEYS or route.algorithm in CONSTRUCTOR_GROUP_KEYS[k]}
    options = {**concerned, **rule, "algorithm": route.algorithm}
    if route.algorithm == "adamw":
        return {k: v for k, v in options.items() if k not in VIEW_KEYS}, route
    return {**options, **conv_view(param, module, options)}, route


def build_param_groups(model: nn.Module, *, rules: Sequence[Rule] = (), matrix_algorithm: str = "muon",
                       **overrides) -> list[dict]:
    """Route every trainable parameter of ``model`` and return torch-style param groups.

    ``rules`` are ``(regex, options)`` pairs matched with ``re.search`` against the canonical
    FQN, first match wins; options may set ``algorithm``, view options and hyperparameters.
    Matrices no rule routes get ``matrix_algorithm`` ("muon", "normuon" or "muown"); conv weights
    are viewed as one flattened matrix each, depthwise convs go to AdamW.
    ``overrides`` are hyperparameters set on every group (a rule's own value wins).
    Why each parameter went where it did is kept for ``routing_report``.
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

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return _grouped(trainable, _owning_modules(model), _vocabulary_head(model), matrix_algorithm, rules, overrides)


def route_named_parameters(named: Sequence[tuple[str, torch.Tensor]]) -> list[dict]:
    """``build_param_groups``'s groups for ``(name, parameter)`` pairs without their model.

    What needs a module is unknown here (embeddings, conv weights, an output head not named
    ``output``/``lm_head``): those parameters are routed as plain matrices. For a model without
    them the groups, their order and ``param_names`` are exactly ``build_param_groups(model)``'s.
    Every pair given is kept (a frozen parameter too, as torch.optim keeps what it is given).
    """
    return _grouped(list(named), {}, None, "muon", (), {})


def _grouped(named: Sequence[tuple[str, torch.Tensor]], owners: Mapping[int, nn.Module], head: Optional[nn.Module],
             matrix_algorithm: str, rules: Sequence[Rule], overrides: Mapping[str, Any]) -> list[dict]:
    """Route each (FQN, parameter); parameters with identical options share a group, in parameter order."""
    groups: dict[tuple, dict] = {}
    for raw_name, param in named:
        name = canonical_fqn(raw_name)
        check_floating_point(name, param)
        options, route = _route(name, param, owners.get(id(param)), head, matrix_algorithm, rules, overrides)
        _ROUTES[param] = route
        key = tuple(sorted((k, _hashable(v)) for k, v in options.items()))
        group = groups.setdefault(key, {"params": [], "param_names": [], **options})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value if isinstance(value, (int, float, str, bool, type(None), torch.dtype)) else repr(value)


def routing_reason(param: torch.Tensor, algorithm: str) -> str:
    """Why ``param`` has ``algorithm``: what ``build_param_groups`` decided, or "param group" when the
    groups were written (or the algorithm changed) by hand."""
    route = _ROUTES.get(param)
    return route.reason if route is not None and route.algorithm == algorithm else "param group"


def routing_rows(groups: Iterable[Mapping[str, Any]], default_adjust_lr: Optional[str] = "original") -> list[dict]:
    """One row per parameter: FQN, shape, algorithm, the reason for it, matrices and lr scale."""
    rows = []
    for gi, group in enumerate(groups):
        names = group.get("param_names") or [f"group{gi}.param{i}" for i in range(len(group["params"]))]
        algorithm = group.get("algorithm", "muon")
        for name, p in zip(names, group["params"]):
            shape = tuple(p.shape)
            row = {"fqn": name, "shape": shape, "algorithm": algorithm, "reason": routing_reason(p, algorithm),
                   "matrices": "-", "lr_scale": "-"}
            if algorithm != "adamw":
                view = build_view(shape, name=name, **view_options(group, name))
                adjust = group.get("adjust_lr", default_adjust_lr)
                row["matrices"] = view.describe()
                row["lr_scale"] = _scales(view.matrix_shapes, adjust)
            rows.append(row)
            if algorithm != "adamw" and group.get("block_algorithms") is not None:
                row["algorithm"] = "+".join(dict.fromkeys(group["block_algorithms"]))
                rows.extend(_block_rows(name, shape, group, adjust))
    return rows


def _scales(shapes, adjust_lr) -> str:
    return "/".join(f"{s:g}" for s in sorted({round(lr_scale(m, n, adjust_lr), 4) for m, n in shapes}))


def _block_rows(name: str, shape: tuple[int, ...], group: Mapping[str, Any], adjust_lr) -> list[dict]:
    """One row per split_sizes block of a mixed-algorithm group: its algorithm, rows and matrices."""
    options = {k: v for k, v in view_options(group, name).items() if k != "matrix_blocks"}
    whole = build_view(shape, name=name, **options)  # every block a matrix: block j is index % blocks
    blocks = tuple(group["block_algorithms"])
    rows = []
    for j, algorithm in enumerate(blocks):
        shapes = [s for i, s in enumerate(whole.matrix_shapes) if i % len(blocks) == j]
        described = f"{len(shapes)}×{shapes[0][0]}×{shapes[0][1]}"
        rows.append({"fqn": f"  {name} block {j}", "shape": described, "algorithm": algorithm,
                     "reason": "block_algorithms", "matrices": described if algorithm == "muon" else "-",
                     "lr_scale": _scales(shapes, adjust_lr) if algorithm == "muon" else "-"})
    return rows


def routing_report(groups_or_optimizer, default_adjust_lr: Optional[str] = "original") -> str:
    """A readable table of where every parameter goes; print it before launching."""
    groups = getattr(groups_or_optimizer, "param_groups", groups_or_optimizer)
    rows = routing_rows(groups, default_adjust_lr)
    header = {"fqn": "parameter", "shape": "shape", "algorithm": "algorithm", "reason": "reason", "matrices": "matrices",
              "lr_scale": "lr scale"}
    table = [header] + [{k: str(v) for k, v in r.items()} for r in rows]
    widths = {k: max(len(str(r[k])) for r in table) for k in header}
    lines = ["  ".join(str(r[k]).ljust(widths[k]) for k in header).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * widths[k] for k in header))
    params = [r for r in rows if r["reason"] != "block_algorithms"]
    counts = {a: sum(r["algorithm"] == a for r in params) for a in ALGORITHMS}
    mixed = len(params) - sum(counts.values())
    lines.append(", ".join([f"{n} {a}" for a, n in counts.items() if n] + ([f"{mixed} with blocks"] if mixed else [])))
    return "\n".join(lines)
