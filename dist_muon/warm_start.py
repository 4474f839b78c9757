"""Warm starts: loading optimizer state that was saved for another routing (opt in at load time).

A checkpoint whose parameters were optimized by other algorithms than the live DistMuon's (a
``torch.optim.AdamW`` run, torchtitan's AdamW, a DistMuon run routed differently) is refused by
default, naming each parameter and both algorithms. ``on_routing_change`` opts in:

* ``"reset"``: every parameter whose algorithm changed starts from the state a new optimizer would
  give it (zeros; Muown's magnitudes from the loaded weights) and its new group's hyperparameters;
* ``"convert"``: the state carries over where both algorithms keep the same quantity:

  ==========================  =========================================================================
  checkpoint → now            state
  ==========================  =========================================================================
  adamw → muon / normuon      ``momentum_buffer ← exp_avg · (1 − μᵗ) / (1 − β₁ᵗ)`` (t: AdamW's step);
                              NorMuon's ``second_moment`` fresh
  muon / normuon → adamw      ``exp_avg ← momentum_buffer``; ``exp_avg_sq`` and ``step`` fresh
  muon ↔ normuon              ``momentum_buffer`` kept; NorMuon's ``second_moment`` fresh
  muown ↔ anything            reset: Muown's momentum is of its direction's gradient, not the weight's
  ==========================  =========================================================================

Why that factor: Adam's ``exp_avg`` and Muon's momentum are the same recursion,
``m ← β·m + (1 − β)·g`` from zero, with β₁ and μ. With β₁ = μ the factor is 1 and the buffer is
exactly the one Muon would hold after the same gradients. With β₁ ≠ μ no buffer is exact (the two
weigh past gradients differently); after t steps an EMA's weights sum to 1 − βᵗ, and the factor gives
the buffer the total weight Muon's own would have, so early switches are not biased towards zero or
overweighted. Its window stays Adam's until Muon's own EMA has replaced it (about 1/(1 − μ) steps);
the factor tends to 1 as t grows (β₁ = 0.9, μ = 0.95: 0.53 after 3 AdamW steps, 0.99 after 90).

In the other direction AdamW's ``step`` restarts at 0 with ``exp_avg_sq``, so its bias correction
1/(1 − β₁ᵗ) treats the carried ``exp_avg`` as if it had been accumulated from zero: in the first steps
the carried momentum weighs β₁ᵗ/(1 − β₁ᵗ) against the new gradients (9 at t = 1 for β₁ = 0.9, below 1
from t = 7). Use "reset", or warm the lr up, where that transient matters.

Every other parameter loads as on any resume: its state, and its param group's values (the
checkpoint's win, as in ``torch.optim``; the members a group keeps must agree on them). Groups whose
members all moved keep the values they were built with.

Sources: any DCP checkpoint whose optimizer state is FQN-keyed and flattened
(``state.<fqn>.<key>``, ``param_groups.<fqn>.<key>``): ``dist_muon.checkpoint.save_checkpoint`` of a
DistMuon or of a ``torch.optim.AdamW``, torchtitan's checkpoints (0.2.2 and 0.3.0); and torch-format
state dicts (``torch.optim.AdamW(...).state_dict()``, full tensors) through ``load_state_dict``. DCP
reshards, so the checkpoint's world size and layout need not be the live one's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from . import checkpoint as ck
from .routing import canonical_fqn

MODES = ("refuse", "reset", "convert")
MATRIX = ("muon", "normuon")
# Param-group keys that are not values a group takes from a checkpoint.
_NOT_VALUES = ("params", "param_names") + ck.STRUCTURAL_GROUP_KEYS


def check_mode(mode: str, where: str = "on_routing_change") -> str:
    if mode not in MODES:
        raise ValueError(f"{where}={mode!r}: expected one of {list(MODES)} ('refuse' raises on a parameter routed "
                         "to another algorithm than in the checkpoint; 'reset' gives it fresh state; 'convert' "
                         "carries its momentum over, see docs/checkpointing.md#warm-starts)")
    return mode


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A checkpoint as a warm start reads it: ``shapes`` has every key with its global shape (None:
    not a tensor); ``read`` fills a request {key: target} in place, resharding tensors to the
    targets' layouts (collective for DCP)."""

    name: str
    shapes: ck.Shapes
    read: ck.Reader


def dcp_source(path: str) -> Source:
    return Source(path, ck.dcp_shapes(path), ck.dcp_reader(path))


def state_dict_source(state_dict: Mapping[str, Any], model: nn.Module, *, optim_prefix: str = "",
                      name: str = "optimizer state dict") -> Source:
    """A torch-format optimizer state dict (integer ids, full tensors) keyed like a DCP checkpoint."""
    flat = {optim_prefix + k: v for k, v in flat_optimizer_state(state_dict, model).items()}
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in flat.items()}
    return Source(name, shapes, _memory_reader(flat))


def flat_optimizer_state(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """``state.<fqn>.<key>`` and ``param_groups.<fqn>.<key>`` entries of a torch-format state dict.

    Parameter ids are named by the groups' ``param_names`` (an optimizer built from
    ``model.named_parameters()``), else by the model's trainable parameters in order (one built from
    ``model.parameters()``, every parameter in one group or the groups in the model's order)."""
    try:
        groups, state = state_dict["param_groups"], state_dict["state"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"not an optimizer state dict (needs 'state' and 'param_groups'): {e}") from None
    ids = [i for g in groups for i in g["params"]]
    if all("param_names" in g for g in groups):
        names = [canonical_fqn(n) for g in groups for n in g["param_names"]]
    else:
        names = [canonical_fqn(n) for n, p in model.named_parameters() if p.requires_grad]
        if len(names) != len(ids):
            raise ValueError(f"the state dict holds {len(ids)} parameters without param_names and the model has "
                             f"{len(names)} trainable ones: build the optimizer from model.named_parameters() "
                             "so that its state dict names them")
    fqn = dict(zip(ids, names))
    flat = {f"state.{fqn[i]}.{k}": v for i, st in state.items() for k, v in st.items()}
    for g in groups:
        for i in g["params"]:
            flat.update({f"param_groups.{fqn[i]}.{k}": v for k, v in g.items() if k != "params"})
    return flat


def _memory_reader(flat: Mapping[str, Any]) -> ck.Reader:
    def read(request: dict) -> None:
        for key, target in request.items():
            value = flat[key]
            if isinstance(target, torch.Tensor):
                _copy_full(target, value, key)
            else:
                request[key] = value

    return read


def _copy_full(target: torch.Tensor, full, key: str) -> None:
    """Write the full tensor ``full`` into ``target``, which may be a shard (this rank's part of it)."""
    if isinstance(full, DTensor):
        raise ValueError(f"{key}: a state dict of distributed tensors cannot be resharded here; save it with "
                         "dist_muon.checkpoint.save_checkpoint (DCP) and load that")
    full = torch.as_tensor(full).detach().to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        target.to_local().copy_(distribute_tensor(full, target.device_mesh, target.placements,
                                                  src_data_rank=None).to_local())
    else:
        target.copy_(full)


# ----------------------------------------------------------------------------- conversions


@dataclass(frozen=True)
class Conversion:
    """What "convert" carries from a parameter's checkpoint state into its new state."""

    copies: tuple[tuple[str, str], ...]  # (checkpoint key, live key)
    rescale: bool = False  # Adam's EMA into Muon's momentum: the (1 − μᵗ)/(1 − β₁ᵗ) factor
    why_not: str = ""  # when nothing carries over


def conversion(then: str, now: str) -> Conversion:
    if then == "adamw" and now in MATRIX:
        return Conversion((("exp_avg", "momentum_buffer"),), rescale=True)
    if then in MATRIX and now == "adamw":
        return Conversion((("momentum_buffer", "exp_avg"),))
    if then in MATRIX and now in MATRIX:
        return Conversion((("momentum_buffer", "momentum_buffer"),))
    return Conversion((), why_not="Muown's momentum is of its direction's gradient, not the weight's")


def ema_factor(beta1: float, momentum: float, step: float) -> float:
    """(1 − μᵗ)/(1 − β₁ᵗ): the total weight of Muon's EMA after t steps over Adam's (1 when β₁ = μ)."""
    if beta1 == momentum or step <= 0:
        return 1.0
    return (1.0 - momentum ** step) / (1.0 - beta1 ** step)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Move:
    """A parameter whose optimizer state in the checkpoint is another algorithm's."""

    fqn: str
    then: str
    now: str


@dataclass(frozen=True)
class WarmStartPlan:
    """What a load does, decided before anything is written (``plan_warm_start``)."""

    source: Source
    mode: str
    optim_prefix: str
    problems: tuple[str, ...]
    moves: Mapping[str, Move] = field(default_factory=dict)
    # per live param group: the values it takes from the checkpoint
    group_values: tuple[Mapping[str, Any], ...] = ()
    # per moved parameter from AdamW: its checkpoint param group's betas (the conversion's factor)
    saved_hyper: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def plan_warm_start(source: Source, model: nn.Module, optimizer: torch.optim.Optimizer, *, mode: str,
                    model_prefix: str = "model.", optim_prefix: str = "optim.", exclusive: bool = True,
                    current: Optional[dict[str, Any]] = None) -> WarmStartPlan:
    """Check ``source`` against model + optimizer and decide what each parameter gets; collective.

    Reads the keys, shapes and param-group entries only; writes nothing. ``problems`` is what makes
    the load impossible (the same on every rank): what ``checkpoint_problems`` reports, except that
    parameters routed to another algorithm are ``moves`` unless ``mode="refuse"``, and members a live
    group keeps from the checkpoint that disagree on a value. Prefixes, ``exclusive`` and ``current``
    as in ``dist_muon.checkpoint.checkpoint_problems``.
    """
    check_mode(mode)
    current = ck.training_state_dict(model, optimizer) if current is None else current
    problems, found = ck.problems_and_moves(source.shapes, source.read, current, model_prefix=model_prefix,
                                            optim_prefix=optim_prefix, exclusive=exclusive,
                                            allow_moves=mode != "refuse")
    plan = WarmStartPlan(source, mode, optim_prefix, tuple(problems))
    if problems:
        return plan
    moves = {fqn: Move(fqn, then, now) for fqn, (then, now) in found.items()}
    values, saved_hyper, disagreements = _group_values(source, optimizer, _fqns(model), moves, optim_prefix)
    return WarmStartPlan(source, mode, optim_prefix, tuple(ck._everyone(disagreements)), moves, values, saved_hyper)


def _fqns(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its FQN as checkpoints key it (wrapper prefixes removed)."""
    out: dict[int, str] = {}
    for name, p in model.named_parameters():
        out.setdefault(id(p), canonical_fqn(name))
    return out


def _group_values(source: Source, optimizer, fqns: dict[int, str], moves: Mapping[str, Move], prefix: str):
    """Per live group, the checkpoint values its kept members agree on; the AdamW betas of moved
    parameters; and disagreements. One read (collective)."""
    def key(fqn: str, option: str) -> str:
        return f"{prefix}param_groups.{fqn}.{option}"

    wanted = {"adamw": ("betas",)}  # the one checkpoint value a conversion uses (β1, for the factor)
    request: dict[str, Any] = {}
    for group in optimizer.param_groups:
        options = [k for k in group if k not in _NOT_VALUES]
        for p in group["params"]:
            fqn = fqns[id(p)]
            names = wanted.get(moves[fqn].then, ()) if fqn in moves else options
            request.update({key(fqn, o): None for o in names if key(fqn, o) in source.shapes})
    source.read(request)  # every rank, even with nothing to read: DCP's load is collective
    values, disagreements = [], []
    for group in optimizer.param_groups:
        kept = [fqns[id(p)] for p in group["params"] if fqns[id(p)] not in moves]
        chosen = {}
        for option in (k for k in group if k not in _NOT_VALUES):
            seen = [(fqn, request[key(fqn, option)]) for fqn in kept if key(fqn, option) in request]
            odd = next(((f, v) for f, v in seen if ck._normal(v) != ck._normal(seen[0][1])), None)
            if odd is not None:
                disagreements.append(
                    f"{seen[0][0]} and {odd[0]} share a param group now but had {option}={seen[0][1]!r} and "
                    f"{odd[1]!r} in the checkpoint (give them separate groups with a rule)")
            elif seen:
                chosen[option] = _like(group[option], seen[0][1])
        values.append(chosen)
    saved_hyper = {fqn: {o: request[key(fqn, o)] for o in wanted.get(m.then, ()) if key(fqn, o) in request}
                   for fqn, m in moves.items()}
    return tuple(values), saved_hyper, disagreements


def _like(live, saved):
    """A saved tuple may come back as a list (and the reverse): keep the live value's type."""
    return type(live)(saved) if isinstance(live, (tuple, list)) and isinstance(saved, (tuple, list)) else saved


# ----------------------------------------------------------------------------- applying it


@dataclass(frozen=True)
class Row:
    fqn: str
    shape: tuple
    then: str
    now: str
    action: str  # "kept", "converted" or "reset"
    detail: str


@dataclass(frozen=True)
class WarmStartReport:
    """What a load did to every parameter's optimizer state; ``str()`` is a table."""

    source: str
    mode: str
    rows: tuple[Row, ...]

    def count(self, action: str) -> int:
        return sum(r.action == action for r in self.rows)

    def __str__(self) -> str:
        header = Row("parameter", "shape", "checkpoint", "now", "state", "how")  # type: ignore[arg-type]
        table = [header, *self.rows]
        cols = ("fqn", "shape", "then", "now", "action", "detail")
        widths = {c: max(len(str(getattr(r, c))) for r in table) for c in cols}
        lines = ["  ".join(str(getattr(r, c)).ljust(widths[c]) for c in cols).rstrip() for r in table]
        lines.insert(1, "  ".join("-" * widths[c] for c in cols))
        summary = ", ".join(f"{self.count(a)} {a}" for a in ("converted", "reset", "kept"))
        return (f"DistMuon warm start from {self.source} (on_routing_change={self.mode!r}): {summary}\n"
                + "\n".join(lines))


@torch.no_grad()
def apply_warm_start(plan: WarmStartPlan, model: nn.Module, optimizer) -> WarmStartReport:
    """Load the optimizer state as ``plan`` says; collective. Load the model first: "reset" gives
    Muown its magnitudes from the weights. Kept state is read into the live tensors (resharded);
    moved parameters get fresh state, then what "convert" carries over; groups take their values."""
    if plan.problems:
        raise ck.CheckpointError(f"checkpoint {plan.source.name} cannot be loaded:\n  " + "\n  ".join(plan.problems))
    fqns = _fqns(model)

    def state_key(name: str) -> str:
        return f"{plan.optim_prefix}state.{name}"

    request: dict[str, Any] = {}
    carried: dict[str, dict[str, torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            fqn, state = fqns[id(p)], optimizer.state[p]
            move = plan.moves.get(fqn)
            if move is None:
                request.update({state_key(f"{fqn}.{k}"): t for k, t in state.items() if not k.startswith("_")})
            elif plan.mode == "convert":
                rule = conversion(move.then, move.now)
                # read in (at least) fp32, whatever the live state's dtype: the factor is applied before rounding
                carried[fqn] = {src: torch.zeros_like(state[dst], dtype=torch.promote_types(state[dst].dtype,
                                                                                            torch.float32))
                                for src, dst in rule.copies}
                request.update({state_key(f"{fqn}.{src}"): t for src, t in carried[fqn].items()})
                if rule.rescale and state_key(f"{fqn}.step") in plan.source.shapes:
                    step_shape = plan.source.shapes[state_key(f"{fqn}.step")]
                    request[state_key(f"{fqn}.step")] = None if step_shape is None else torch.zeros(step_shape)
    plan.source.read(request)
    moved = [p for g in optimizer.param_groups for p in g["params"] if fqns[id(p)] in plan.moves]
    optimizer.reset_state(moved)
    rows = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            fqn = fqns[id(p)]
            move = plan.moves.get(fqn)
            if move is None:
                rows.append(Row(fqn, tuple(p.shape), group["algorithm"], group["algorithm"], "kept", ""))
                continue
            action, detail = "reset", "fresh state"
            if plan.mode == "convert":
                action, detail = _convert(move, group, optimizer.state[p], carried[fqn], plan, request)
            rows.append(Row(fqn, tuple(p.shape), move.then, move.now, action, detail))
    for group, values in zip(optimizer.param_groups, plan.group_values):
        group.update(values)
    return WarmStartReport(plan.source.name, plan.mode, tuple(rows))


def _convert(move: Move, group: dict, state: dict, carried: dict, plan: WarmStartPlan, request: dict):
    """Copy what the conversion carries into ``state`` (already fresh); (action, detail) for the report."""
    rule = conversion(move.then, move.now)
    if not rule.copies:
        return "reset", f"fresh state ({rule.why_not})"
    notes = []
    for src, dst in rule.copies:
        value = carried[src]
        betas = plan.saved_hyper.get(move.fqn, {}).get("betas")
        if rule.rescale and betas is not None:
            beta1 = float(betas[0])
            step = request.get(f"{plan.optim_prefix}state.{move.fqn}.step", 0.0)
            step = float(step.item() if isinstance(step, torch.Tensor) else step or 0.0)
            factor = ema_factor(beta1, group["momentum"], step)
            if factor != 1.0:
                value = value * factor
                notes.append(f"{dst} ← {src} × {factor:.4g} (β1={beta1:g}, momentum={group['momentum']:g}, "
                             f"AdamW step {step:g})")
            else:
                notes.append(f"{dst} ← {src}")
        else:
            notes.append(f"{dst} kept" if src == dst else f"{dst} ← {src}")
        state[dst].copy_(value)
    fresh = [k for k in state if not k.startswith("_") and k not in {d for _, d in rule.copies}]
    if fresh:
        notes.append(f"{', '.join(fresh)} fresh")
    return "converted", "; ".join(notes)


# ----------------------------------------------------------------------------- whole loads


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank (collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    flags: list = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return any(flags)


def load_checkpoint_with_moves(path: str, plan: WarmStartPlan, model: nn.Module, optimizer, *,
                               lr_schedulers: Sequence[Any] = (), log: Optional[Callable[[str], None]] = print) -> dict:
    """``dist_muon.checkpoint.load_checkpoint``'s warm start (``plan`` has moves); collective.

    Model, train state and the schedulers' positions are read first, then the optimizer as
    ``apply_warm_start`` says. Each scheduler resumes at its saved step with every group's own
    ``initial_lr`` as its base (the saved base lrs are another optimizer's groups) and recomputes the
    lrs: closed-form schedules (``LambdaLR``, torchtitan's) continue exactly."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model),
             "lr_schedulers": [{"last_epoch": 0, "_step_count": 0} for _ in lr_schedulers],
             "train_state": {"step": 0, "world_size": 0, "extra": {}}}
    ok, message = True, ""
    try:
        plan.source.read(state)
    except Exception as e:  # noqa: BLE001 - re-raised below with the path, on every rank
        ok, message = False, f"checkpoint {path}: DCP load failed ({type(e).__name__}: {e})"
    ck._agree(ok, message)
    set_model_state_dict(model, state["model"])
    report = apply_warm_start(plan, model, optimizer)
    for scheduler, position in zip(lr_schedulers, state["lr_schedulers"]):
        resume_schedule(scheduler, position["last_epoch"], position["_step_count"])
    if log is not None and ck._rank() == 0:
        log(str(report))
    return {**state["train_state"], "warm_start": report}


def resume_schedule(scheduler, last_epoch: int, step_count: int) -> None:
    """Put ``scheduler`` at ``last_epoch`` with every group's ``initial_lr`` as its base lr and set the lrs."""
    from torch.optim.lr_scheduler import _enable_get_lr_call

    groups = scheduler.optimizer.param_groups
    scheduler.last_epoch, scheduler._step_count = last_epoch, step_count
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    with _enable_get_lr_call(scheduler):
        lrs = scheduler.get_lr()
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = [g["lr"] for g in groups]


def load_state_dict(model: nn.Module, optimizer, state_dict: Mapping[str, Any], *, on_routing_change: str,
                    log: Optional[Callable[[str], None]] = print) -> WarmStartReport:
    """Load a torch-format optimizer state dict (``torch.optim.AdamW(...).state_dict()``, a DistMuon's
    of a single process) into ``optimizer`` with ``on_routing_change``; load the model's weights
    first. Full tensors are cut to this rank's shards, so a single-process state dict loads on any
    layout. Raises ValueError naming the parameters when it does not fit."""
    check_mode(on_routing_change)
    source = state_dict_source(state_dict, model)
    current = {"model": {}, "optim": ck.training_state_dict(model, optimizer)["optim"]}
    plan = plan_warm_start(source, model, optimizer, mode=on_routing_change, model_prefix="", optim_prefix="",
                           current=current)
    if plan.problems:
        raise ValueError(f"the {source.name} does not fit this optimizer:\n  " + "\n  ".join(plan.problems)
                         + ck.routing_hint(plan.problems, "on_routing_change='reset' or 'convert'"))
    report = apply_warm_start(plan, model, optimizer)
    if log is not None and ck._rank() == 0 and plan.moves:
        log(str(report))
    return report
