"""Routing torchtitan models (0.2.2 and 0.3.0): the param groups of one model part.

``dm.build_param_groups`` knows modules (embeddings, the vocabulary head, convs) but not
torchtitan's attention layouts. This adds, per attention module found in the part, the view
its projections need, as rules placed after the user's (so a user rule still wins):

* 0.3.0's fused ``wqkv`` (``FusedQKVLinear``) interleaves its rows per KV group as
  ``(n_kv, heads_per_kv + 2, head_dim)``: ``attention_view="qkv"`` makes Q, K and V three whole
  matrices (``split_sizes`` + ``interleave``), the same update as separate ``wq``/``wk``/``wv``;
* ``attention_view="heads"`` makes every head its own matrix, for fused and separate projections
  and for MLA's ``wq``/``wq_b``/``wkv_b``.

Modules are recognised by their attributes, not their classes, so this imports no torchtitan.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

import dist_muon as dm

from .options import parse_rules

Rule = tuple[str, Mapping[str, Any]]


def param_groups(part: nn.Module, *, rules: Sequence[Rule], matrix_algorithm: str, attention_view: str) -> list[dict]:
    """DistMuon param groups of one model part: the user's rules first, then the attention views."""
    return dm.build_param_groups(part, rules=[*rules, *attention_rules(part, attention_view)],
                                 matrix_algorithm=matrix_algorithm)


def distmuon_per_part(model_parts: Sequence[nn.Module], cfg, kwargs: Mapping[str, Any], log: Callable[[str], None],
                      check_part: Callable[[nn.Module], None] = lambda part: None
                      ) -> tuple[list[dm.DistMuon], list[torch.Tensor]]:
    """One DistMuon per model part (pipeline stage), routed by the config's ``rules``,
    ``matrix_algorithm`` and ``attention_view``; the routing report goes to ``log`` on rank 0.
    Returns the optimizers and every parameter they hold."""
    rules = parse_rules(cfg.rules)
    optimizers, params = [], []
    for part in model_parts:
        check_part(part)
        groups = param_groups(part, rules=rules, matrix_algorithm=cfg.matrix_algorithm,
                              attention_view=cfg.attention_view)
        if cfg.log_routing and is_rank0():
            log(f"DistMuon routing:\n{dm.routing_report(groups)}")
        optimizers.append(_with_qk_clip(part, groups, kwargs, cfg, log))
        params.extend(p for g in groups for p in g["params"])
    return optimizers, params


def _with_qk_clip(part: nn.Module, groups: list[dict], kwargs: Mapping[str, Any], cfg,
                  log: Callable[[str], None]) -> dm.DistMuon:
    """The part's DistMuon; with QK-clip on, its attention heads registered and the max-logit hooks
    installed (nothing of either when it is off)."""
    if kwargs.get("qk_clip_threshold") is None:
        return dm.DistMuon(groups, **kwargs)
    from . import qk_logits
    from .version import torchtitan_version

    found = qk_logits.attentions(part)
    if not found:  # a pipeline stage without attention layers
        return dm.DistMuon(groups, **{**kwargs, "qk_clip_threshold": None})
    opt = dm.DistMuon(groups, **kwargs, qk_clip_heads=[a.heads for a in found])
    v022 = torchtitan_version()[:2] == (0, 2)  # 0.2.2 passes the CP positions to the model: the hooks read them
    qk_logits.install(found, opt, qk_logits.BNLH if v022 else qk_logits.BLNH, chunk=cfg.qk_clip_chunk,
                      part=part if v022 else None)
    if is_rank0():
        log(f"DistMuon QK-clip: tau {kwargs['qk_clip_threshold']:g}, alpha {kwargs['qk_clip_alpha']:g}, "
            f"{len(found)} attention layers, {opt.qk_clip.n_heads} heads")
    return opt


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def attention_rules(model: nn.Module, attention_view: str) -> list[Rule]:
    """One exact-FQN rule per attention projection whose matrices are not the whole weight."""
    rules = []
    for prefix, module in model.named_modules():
        for fqn, options in _projection_views(module, attention_view):
            name = dm.canonical_fqn(f"{prefix}.{fqn}" if prefix else fqn)
            rules.append((f"^{re.escape(name)}$", options))
    return rules


def _rows(linear: nn.Module) -> int:
    """Global rows of a projection (a DTensor's shape is global)."""
    return int(linear.weight.shape[0])


def _projection_views(module: nn.Module, attention_view: str) -> Iterator[tuple[str, dict]]:
    fused = getattr(module, "wqkv", None)
    if isinstance(fused, nn.Linear) and hasattr(module, "heads_per_kv") and hasattr(module, "head_dim"):
        yield "wqkv.weight", _fused_qkv_view(_rows(fused), module.heads_per_kv, module.head_dim, attention_view)
        return
    if attention_view != "heads":
        return
    head_dim = getattr(module, "head_dim", None)
    if isinstance(head_dim, int) and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("wq", "wk", "wv")):
        for name in ("wq", "wk", "wv"):
            yield f"{name}.weight", {"num_heads": _heads(_rows(getattr(module, name)), head_dim, name)}
        return
    qk_head_dim = getattr(module, "qk_head_dim", None)  # MLA (deepseek_v3)
    if isinstance(qk_head_dim, int):
        for name in ("wq", "wq_b"):
            if isinstance(getattr(module, name, None), nn.Linear):
                yield f"{name}.weight", {"num_heads": _heads(_rows(getattr(module, name)), qk_head_dim, name)}
        wkv_b = getattr(module, "wkv_b", None)
        if isinstance(wkv_b, nn.Linear):
            per_head = module.qk_nope_head_dim + module.v_head_dim
            yield "wkv_b.weight", {"num_heads": _heads(_rows(wkv_b), per_head, "wkv_b")}


def _heads(rows: int, head_dim: int, name: str) -> int:
    if rows % head_dim:
        raise ValueError(f"{name}: {rows} rows are not a whole number of heads of {head_dim} rows")
    return rows // head_dim


def _fused_qkv_view(rows: int, heads_per_kv: int, head_dim: int, attention_view: str) -> dict:
    """Q, K, V out of rows ``(n_kv, heads_per_kv + 2, head_dim)``, or one matrix per head."""
    group = (heads_per_kv + 2) * head_dim
    if rows % group:
        raise ValueError(f"wqkv: {rows} rows are not a whole number of KV groups of (heads_per_kv + 2) × head_dim "
                         f"= {group} rows")
    if attention_view == "heads":
        return {"num_heads": rows // head_dim}
    return {"split_sizes": (heads_per_kv * head_dim, head_dim, head_dim), "interleave": rows // group}
