"""DistMuon: Muon, Muown and AdamW groups in one torch.optim.Optimizer, on any DTensor layout."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

from .. import comm
from .. import qk_clip as qk
from ..layout import layout_of, widened
from ..numerics import muown as muown_math
from ..numerics import row_state_dtype
from ..plan import MatrixSpec, Plan, build_plan, spec_fingerprint
from ..routing import VIEW_KEYS
from ..views import row_statistic_shape, rows_view
from ..schedule import local_schedule
from . import copying
from .blocks import LocalRows, local_rows, mixed_step_
from .graphed import GraphedMatrixStep
from .group_keys import current_lrs
from .groups import MATRIX_ALGORITHMS, check_policy, complete_group, has_adamw_blocks, ns_key, view_of
from .named_params import normalize_param_groups
from .pipeline import BucketRunner, StepStats
from .state_dtype import Scratch, check_state_dtype, group_adamw_, group_momentum_, momentum_one_, state_dtype_of

DEFAULT_BUCKET_BYTES = 512 * 2**20


class RankDisagreement(RuntimeError):
    """Ranks built optimizers that would not communicate consistently."""


class DistMuon(torch.optim.Optimizer):
    """Distributed Muon (+ Muown and AdamW groups) for plain, FSDP2, HSDP, TP and EP parameters.

    Every Muon parameter is a batch of matrices (see ``dist_muon.views``); each matrix is
    orthogonalized once, whole, by one owner rank, and the result is applied to every shard.
    See docs/update_rule.md for the exact update rule.

    Args:
        params: param groups (``dm.build_param_groups(model)``; their params may be ``(name, tensor)``
            pairs), ``model.named_parameters()``, or plain tensors.
        lr: the Muon lr and every group's default; optional when every group has its own. A float or a
            1-element tensor (read at every step: schedulers and in-place changes drive it).
        momentum, nesterov, weight_decay: Muon hyperparameters (decoupled weight decay).
        ns_method: "polar_express", "quintic" or a list of (a, b, c) triples; ns_steps; ns_dtype.
        adjust_lr: "original" (sqrt(max(1, m/n))), "match_rms_adamw" (0.2·sqrt(max(m, n))) or None.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults for "adamw" groups
            (``adamw_lr`` defaults to ``lr``, ``adamw_weight_decay`` to ``weight_decay``).
        normuon_beta2, normuon_eps: defaults of "normuon" groups' ``beta2`` and ``eps`` (NorMuon's
            per-row second moment of the orthogonalized update; see docs/update_rule.md).
        process_group: only for plain (non-DTensor) parameters replicated across ranks (DDP style).
        owner_policy: "balanced" (by Newton–Schulz FLOPs) or "round_robin".
        bucket_bytes: budget for whole matrices a rank assembles at once (two buckets in flight).
        nonfinite_grad: "raise" or "skip" (skip the whole step, with a warning) on inf/NaN gradients.
        cuda_graph: run the Muon/NorMuon part of each step as a captured CUDA graph (captured on the
            second step, replayed after; lr, weight decay and which parameters have gradients stay
            live). On CPU the same code runs eagerly. Call ``release_graph()`` before
            ``destroy_process_group``. Not with Muown groups.
        state_dtype: the dtype of momentum buffers and AdamW moments (default None: each parameter's
            own), e.g. ``torch.bfloat16`` with fp32 parameters for half the state memory; the math
            stays fp32 and the state is rounded once per step (docs/update_rule.md). Per group too.
        compile_ns: ``torch.compile`` the torch Newton–Schulz loop (off: it did not pay on CPU, see
            docs/benchmarks.md; the Triton kernels are used on CUDA either way).
        qk_clip_threshold, qk_clip_alpha, qk_clip_heads: QK-clip (MuonClip; off by default): after each
            step, every head whose largest attention logit exceeded τ = ``qk_clip_threshold`` has its
            query/key rows scaled so that its logits shrink by τ / S_max (α = ``qk_clip_alpha``: the
            query's share). ``qk_clip_heads``: ``dm.qk_clip.AttentionHeads`` of the model's layers;
            each forward fills ``opt.qk_clip.max_logits`` (see dist_muon/qk_clip.py, docs/qk_clip.md).

    Any hyperparameter may be a group key; ``adamw_*`` / ``normuon_*`` ones in the groups they concern
    (see ``group_keys``). ``copy.deepcopy`` and pickle give an optimizer that steps like this one
    (see ``copying``). Differences from torch.optim: docs/torch_optim.md.
    """

    def __init__(
        self,
        params,
        *,
        lr: Optional[float | torch.Tensor] = None,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_method: Any = "polar_express",
        ns_steps: int = 5,
        ns_dtype: Any = "auto",
        adjust_lr: Optional[str] = "original",
        adamw_lr: Optional[float | torch.Tensor] = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: Optional[float] = None,
        normuon_beta2: float = 0.95,
        normuon_eps: float = 1e-8,
        process_group: Optional[dist.ProcessGroup] = None,
        owner_policy: str = "balanced",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        nonfinite_grad: str = "raise",
        compile_ns: bool = False,
        cuda_graph: bool = False,
        state_dtype: Any = None,
        qk_clip_threshold: Optional[float] = None,
        qk_clip_alpha: float = 0.5,
        qk_clip_heads: Sequence[qk.AttentionHeads] = (),
    ):
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_method=ns_method,
            ns_steps=ns_steps, ns_dtype=ns_dtype, adjust_lr=adjust_lr,
            adamw_lr=lr if adamw_lr is None else adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            adamw_weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
            normuon_beta2=normuon_beta2, normuon_eps=normuon_eps,
            state_dtype=check_state_dtype(state_dtype, "state_dtype"),
        )
        self._group_defaults = defaults
        self.nonfinite_grad = check_policy(nonfinite_grad)
        self.owner_policy = owner_policy
        self.bucket_bytes = bucket_bytes
        self.compile_ns = bool(compile_ns)
        self.cuda_graph = bool(cuda_graph)
        self._graphed: Optional[GraphedMatrixStep] = None
        self._plan: Optional[Plan] = None
        self._plan_key: Optional[tuple] = None
        self._digest_cache: tuple = (None, None)
        self.last_step_stats: Optional[StepStats] = None
        qk_clip_heads = tuple(qk_clip_heads or ())
        qk.check_settings(qk_clip_threshold, qk_clip_alpha, qk_clip_heads)
        self.qk_clip_threshold, self.qk_clip_alpha = qk_clip_threshold, qk_clip_alpha
        self._qk_maxima: Optional[torch.Tensor] = None
        groups = normalize_param_groups(params)
        # Keys a group has only when set stay out of torch's defaults (torch would add them to every group).
        torch_defaults = {k: v for k, v in defaults.items()
                          if not k.startswith(("adamw_", "normuon_")) and k != "state_dtype"}
        super().__init__(groups, torch_defaults)
        all_params = [p for g in self.param_groups for p in g["params"]]
        self._comm = comm.resolve_comm_group(all_params, process_group)
        self._device = comm.local_tensor(all_params[0]).device
        self._scratch = self._new_scratch()
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(group, p)
        self.qk_clip: Optional[qk.QKClip] = self._new_qk_clip(qk_clip_heads)
        self._ensure_plan()
        self._check_ranks_agree()

    def _new_qk_clip(self, heads: Sequence[qk.AttentionHeads]) -> Optional[qk.QKClip]:
        """QK-clip's row map of ``heads`` over this optimizer's parameters. The heads are fixed for the
        optimizer's life: the maxima they add to the step's all-reduce have the same length on every
        rank once construction agreed on them."""
        if not heads:
            return None
        names = {id(p): n for gi, g in enumerate(self.param_groups) for p, n in zip(g["params"], self._names(g, gi))}
        return qk.QKClip(heads, names, self._comm, self._device)

    def _new_scratch(self) -> Scratch:
        """fp32 working copies of low-precision state, a bucket budget at a time."""
        return Scratch(self.bucket_bytes, self._device, keep=self.cuda_graph)

    # ------------------------------------------------------------------ groups and state

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **copying.settings_state(self)}

    def __setstate__(self, state: dict) -> None:
        settings = copying.pop_settings(state)  # None when torch's load_state_dict sets state and groups
        super().__setstate__(state)
        copying.finish_setstate(self, settings)

    def add_param_group(self, param_group: dict) -> None:
        group = complete_group(param_group, len(self.param_groups), self._group_defaults)
        super().add_param_group(group)
        if hasattr(self, "_comm"):
            for p in group["params"]:
                self._init_state(group, p)
            self._plan_key = None  # rebuilt at the next step, whose all-reduce checks every rank did the same

    def _names(self, group: dict, gi: int) -> list[str]:
        return list(group.get("param_names") or [f"param_groups[{gi}][{i}]" for i in range(len(group["params"]))])

    @torch.no_grad()
    def _init_state(self, group: dict, p: torch.Tensor) -> None:
        """Eager, identical on every rank, mirroring the parameter's layout (so DCP can reshard it)."""
        state = self.state[p]
        if state:
            return
        algorithm = group["algorithm"]
        dtype = state_dtype_of(group, p)
        if algorithm == "adamw":
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            return
        state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if has_adamw_blocks(group):  # AdamW's state for the AdamW rows, over the whole parameter (its layout)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if algorithm == "normuon":
            view = view_of(group, p, "param")
            state["second_moment"] = _zeros_like_layout(p, row_statistic_shape(view),
                                                         row_state_dtype(ns_key(group, self._device).dtype))
        if algorithm == "muown":
            dims = view_of(group, p, "param").row_norm_dims
            norms = _settled(muown_math.row_norms(p.detach().float(), dims))
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["magnitude"] = norms.clone()
            state["direction_norm"] = norms.clone()
            state["magnitude_exp_avg"] = torch.zeros_like(norms)
            state["magnitude_exp_avg_sq"] = torch.zeros_like(norms)

    @torch.no_grad()
    def reset_state(self, params) -> None:
        """Give ``params`` the state a new optimizer would (Muown's magnitudes from their current
        values), written into the existing state tensors, so a captured CUDA graph stays valid."""
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for p in params:
            live = self.state.pop(p)
            self._init_state(groups[id(p)], p)
            for key, fresh in self.state[p].items():
                live[key].copy_(fresh)
            self.state[p] = live

    # ------------------------------------------------------------------ the plan

    def _matrix_params(self) -> list[tuple[int, dict, torch.Tensor, str]]:
        """(group index, group, parameter, name) of every muon, normuon and muown parameter, in plan order."""
        return [
            (gi, group, p, name)
            for gi, group in enumerate(self.param_groups) if group["algorithm"] in MATRIX_ALGORITHMS
            for p, name in zip(group["params"], self._names(group, gi))
        ]

    def _current_plan_key(self) -> tuple:
        """Everything the plan depends on, cheap to compare every step (a change rebuilds the plan)."""
        groups = tuple(
            (g["algorithm"], repr(g.get("ns_method")), g.get("ns_steps"), g.get("ns_dtype"), g.get("adjust_lr"),
             *(repr(g.get(k)) for k in VIEW_KEYS), tuple(map(id, g["params"])))
            for g in self.param_groups
        )
        return (self.bucket_bytes, self.owner_policy, groups, self.qk_clip_threshold, self.qk_clip_alpha)

    def _ensure_plan(self) -> Plan:
        """The plan for the current settings; rebuilt locally (no collective) when they change.

        Ranks cannot hang over it: every step's all-reduce carries the plan's digest, and ranks whose
        digests differ all raise RankDisagreement before any piece moves.
        """
        key = self._current_plan_key()
        if key == self._plan_key:
            return self._plan
        if self.qk_clip is not None:  # changed after construction: None turns clipping off
            qk.check_settings(self.qk_clip_threshold, self.qk_clip_alpha, self.qk_clip.heads, optional=True)
        entries = self._matrix_params()
        specs = [
            MatrixSpec(
                name=name, view=view_of(group, p, name), layout=layout_of(p, self._comm.ranks),
                ns_key=ns_key(group, self._device), adjust_lr=group["adjust_lr"], group=gi,
            )
            for gi, group, p, name in entries
        ]
        # NorMuon's per-row second moments travel with their matrices, as NS-dtype elements.
        self._rows_specs = {}
        for pi, (gi, group, p, name) in enumerate(entries):
            if group["algorithm"] == "normuon":
                spec = specs[pi]
                width = row_state_dtype(spec.ns_key.dtype).itemsize // spec.ns_key.itemsize
                self._rows_specs[len(specs)] = p
                specs.append(dataclasses.replace(
                    spec, name=f"{name}:second_moment", view=rows_view(spec.view, width), companion_of=pi,
                    layout=widened(layout_of(self.state[p]["second_moment"], self._comm.ranks), width),
                ))
        for spec, (_, _, p, _) in zip(specs, entries):
            expected = spec.layout.local_shape(self._comm.rank)
            if tuple(comm.local_tensor(p).shape) != expected:
                raise ValueError(
                    f"{spec.name}: local shard shape {tuple(comm.local_tensor(p).shape)} does not match the "
                    f"layout's {expected} ({spec.layout.description}); this placement is not supported"
                )
        plan = build_plan(specs, self._comm.world, bucket_bytes=self.bucket_bytes, owner_policy=self.owner_policy)
        self._plan, self._plan_key = plan, key
        self._agreement = self._agreement_record(specs)
        self._plan_digest = _digest(repr(self._agreement))
        self._runner = BucketRunner(local_schedule(plan, self._comm.rank), self._comm, self._device, self.compile_ns,
                                    keep_workspace=self.cuda_graph)
        self._rows_views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # this rank's AdamW / Muon rows of every parameter with AdamW blocks
        self._local_rows: dict[int, LocalRows] = {
            pi: local_rows(specs[pi].view, specs[pi].layout, self._comm.rank)
            for pi, (_, group, _, _) in enumerate(entries) if has_adamw_blocks(group)
        }
        self._muown_updates = {
            pi: torch.zeros_like(comm.local_tensor(p), dtype=torch.float32, memory_format=torch.contiguous_format)
            for pi, (_, group, p, _) in enumerate(entries) if group["algorithm"] == "muown"
        }
        if self.cuda_graph:
            muown = [self._names(g, gi)[0] for gi, g in enumerate(self.param_groups) if g["algorithm"] == "muown"]
            if muown:
                raise ValueError(f"cuda_graph=True does not support Muown groups ({muown[0]}, ...): route them to "
                                 "muon/normuon or leave cuda_graph off")
            mixed = [self._names(g, gi)[0] for gi, g in enumerate(self.param_groups) if has_adamw_blocks(g)]
            if mixed:
                raise ValueError(f"cuda_graph=True does not support AdamW blocks in block_algorithms ({mixed[0]}, ...): "
                                 "leave cuda_graph off for a model with such fused weights")
            self._graphed = GraphedMatrixStep(self, self._runner)
        return plan

    def release_graph(self) -> None:
        """Drop the captured CUDA graph (call before ``destroy_process_group``); the next step recaptures."""
        if self._graphed is not None:
            self._graphed.release()

    def _agreement_record(self, specs) -> dict:
        """Everything ranks must agree on; compared by digest first, in detail only on mismatch."""
        hyper = [
            {"first parameter": self._names(g, gi)[0], "number of parameters": len(g["params"]),
             **{k: repr(v) for k, v in g.items() if k not in ("params", "param_names", "initial_lr", "lr")}}
            for gi, g in enumerate(self.param_groups)
        ]
        adamw = [(n, tuple(p.shape)) for gi, g in enumerate(self.param_groups) if g["algorithm"] == "adamw"
                 for p, n in zip(g["params"], self._names(g, gi))]
        return {
            "options": (self.bucket_bytes, self.owner_policy, self.nonfinite_grad, self._comm.ranks),
            "groups": hyper,
            "matrix parameters": [spec_fingerprint(s) for s in specs],
            "adamw parameters": adamw,
            "qk clip": (repr(self.qk_clip_threshold), repr(self.qk_clip_alpha),
                        None if self.qk_clip is None else self.qk_clip.row_map.fingerprint),
        }

    def _check_ranks_agree(self) -> None:
        """At construction: compare configurations (learning rates included) before any data moves."""
        if self._comm.group is None:
            return
        record = {**self._agreement, "lr": [repr(lr) for lr in current_lrs(self.param_groups)]}
        digest = torch.tensor(_digest(repr(record)), dtype=torch.int64, device=self._device)
        gathered = [torch.empty_like(digest) for _ in range(self._comm.world)]
        dist.all_gather(gathered, digest, group=self._comm.group)
        if not all(torch.equal(g, digest) for g in gathered):
            self._raise_disagreement(record)

    def _raise_disagreement(self, record: dict) -> None:
        """Every rank calls this together (they all saw the same mismatch), so the gather cannot hang."""
        records = [None] * self._comm.world
        dist.all_gather_object(records, record, group=self._comm.group)
        raise RankDisagreement(_describe_disagreement(records))

    @property
    def plan(self) -> Plan:
        """The frozen plan (owners, buckets, per-rank FLOPs); ``print(opt.plan.describe())``."""
        return self._ensure_plan()

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_plan()
        has_grad = self._agree_on_gradients()
        if has_grad is None:
            self.last_step_stats = StepStats(rank=self._comm.rank, skipped=True)
            if self.qk_clip is not None:
                self.qk_clip.reset()
            return loss
        self._match_gradient_placements()
        lrs = current_lrs(self.param_groups)
        for group, lr in zip(self.param_groups, lrs):
            if group["algorithm"] == "adamw":
                self._adamw_step(group, lr, has_grad)
        if self._graphed is not None:
            stats = self._graphed.step(has_grad, lrs)
        else:
            stats = self._matrix_step(has_grad, lrs)
        self.last_step_stats = stats if self.qk_clip is None else self._clip_qk(stats)
        return loss

    def _matrix_step(self, has_grad: dict[int, bool], lrs: list[float]) -> StepStats:
        """The Muon, NorMuon and Muown parameters' step, eagerly."""
        entries = self._matrix_params()
        inputs = self._muon_inputs(entries, has_grad, lrs)
        outputs = [self._muown_updates.get(pi, comm.local_tensor(p)) for pi, (_, _, p, _) in enumerate(entries)]
        rows = self._second_moments()
        inputs += rows
        outputs += rows
        factors = {gi: (1.0 if g["algorithm"] == "muown" else -lrs[gi])
                   for gi, g in enumerate(self.param_groups) if g["algorithm"] in MATRIX_ALGORITHMS}
        normuon = {gi: (g["beta2"], g["eps"]) for gi, g in enumerate(self.param_groups) if g["algorithm"] == "normuon"}
        muted = frozenset(pi for pi, (_, _, p, _) in enumerate(entries) if not has_grad[id(p)])
        stats = self._runner.run(inputs, outputs, factors, muted, normuon)
        for pi, (gi, group, p, name) in enumerate(entries):
            if group["algorithm"] == "muown" and has_grad[id(p)]:
                self._muown_finish(group, lrs[gi], p, name, self._muown_updates[pi])
        return stats

    def _clip_qk(self, stats: StepStats) -> StepStats:
        """QK-clip after the step, from the maxima the step's all-reduce brought (device only; eager
        also after a CUDA-graph replay, on the same stream); then the maxima buffer starts over."""
        maxima = self._qk_maxima
        if self._comm.group is None:  # the buffer itself: it starts over below
            maxima = maxima.clone()
        if self.qk_clip_threshold is None:
            self.qk_clip.last_maxima = maxima
            stats.qk_max_logit = maxima.max()
        else:
            result = self.qk_clip.apply(maxima, float(self.qk_clip_threshold), float(self.qk_clip_alpha))
            stats.qk_max_logit, stats.qk_heads_clipped = result.max_logit, result.heads_clipped
        self.qk_clip.reset()
        return stats

    def _match_gradient_placements(self) -> None:
        """Gradients laid out like their parameters: under TP torchtitan leaves e.g. an embedding's
        gradient Replicate (weight Shard(0)) and a norm's Partial (weight Replicate).

        Collective, after the ranks agreed on which parameters have gradients, in parameter order,
        so every rank redistributes the same gradients in the same order. Placements are the same
        every step, so the check is Python only once nothing differs.
        """
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if isinstance(g, DTensor) and g.placements != p.placements:
                    p.grad = g.redistribute(p.device_mesh, p.placements)

    def _second_moments(self) -> list[torch.Tensor]:
        """NorMuon's second moments (local), each viewed as the NS dtype's elements, in plan order.

        The views are kept while the state tensor is the same (load_state_dict replaces it)."""
        out = []
        for pi, p in self._rows_specs.items():
            state = self.state[p]["second_moment"]
            cached = self._rows_views.get(pi)
            if cached is None or cached[0] is not state:
                dtype = self._plan.params[pi].ns_key.dtype
                cached = (state, comm.local_tensor(state).view(dtype))
                self._rows_views[pi] = cached
            out.append(cached[1])
        return out

    def _agree_on_gradients(self) -> Optional[dict[int, bool]]:
        """Which parameters have gradients, whether all are finite, and that every rank runs the same plan.

        One all-reduce (MAX) of a fixed-size vector per step, and the step's only host sync:
        [non-finite count, plan digest, −plan digest, gradient-set digest, −its negation], then with
        QK-clip every head's max logit (order-preserving int64 codes: the MAX is the heads' maxima
        over the ranks). Equal digests on every rank make max = −max(−d); any difference makes
        every rank raise together, before a piece moves. Returns None when the step must be skipped.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        flags = tuple(p.grad is not None for p in params)
        local_grads = []
        for p in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{self._name_of(p)}: sparse gradients are not supported by DistMuon")
            if p.grad.is_complex():
                raise ValueError(f"{self._name_of(p)}: complex gradients are not supported by DistMuon")
            local_grads.append(comm.local_tensor(p.grad))
        # A norm is inf/NaN exactly when some element is: one fused reduction instead of isfinite per tensor.
        if local_grads:
            norms = torch.stack(torch._foreach_norm(local_grads, 2, dtype=torch.float32))
            nonfinite = torch.isinf(norms).logical_or_(torch.isnan(norms)).sum().view(1)
        else:
            nonfinite = torch.zeros(1, dtype=torch.int64, device=self._device)
        parts = [nonfinite.to(self._device), self._digests(flags)]
        if self.qk_clip is not None and self._comm.group is not None:
            parts.append(qk.encode_maxima(self.qk_clip.max_logits))  # reduced by the same all-reduce
        vector = torch.cat(parts)
        if self._comm.group is not None:
            dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=self._comm.group)
        if self.qk_clip is not None:
            self._qk_maxima = self.qk_clip.max_logits if self._comm.group is None else qk.decode_maxima(vector[5:])
            vector = vector[:5]
        bad, *digests = vector.tolist()
        plan_ok = digests[0] == -digests[1]
        grads_ok = digests[2] == -digests[3]
        if not plan_ok:
            self._raise_disagreement(self._agreement)
        if not grads_ok:
            self._raise_gradient_disagreement(params, flags)
        if bad:
            message = f"DistMuon: non-finite gradients in {int(bad)} tensor(s) this step"
            if self.nonfinite_grad == "raise":
                raise FloatingPointError(message + "; set nonfinite_grad='skip' to skip such steps instead")
            warnings.warn(message + "; the step was skipped (parameters and state unchanged)", stacklevel=3)
            return None
        return {id(p): f for p, f in zip(params, flags)}

    def _digests(self, flags: tuple[bool, ...]) -> torch.Tensor:
        """[d, −d, f, −f] on the device, for the plan digest d and the gradient-set digest f.

        Cached: in steady state no tensor is created from host data (that would be a copy, and on
        CUDA a sync, every step)."""
        key = (self._plan_digest, flags)
        if self._digest_cache[0] != key:
            f = _digest(repr(flags))
            d = self._plan_digest
            self._digest_cache = (key, torch.tensor([d, -d, f, -f], dtype=torch.int64, device=self._device))
        return self._digest_cache[1]

    def _raise_gradient_disagreement(self, params, flags) -> None:
        every = [None] * self._comm.world
        dist.all_gather_object(every, flags, group=self._comm.group)
        for i, p in enumerate(params):
            count = sum(bool(f[i]) if i < len(f) else False for f in every)
            if count not in (0, self._comm.world):
                raise RankDisagreement(
                    f"some ranks have a gradient and others not for {self._name_of(p)} ({count} of "
                    f"{self._comm.world} ranks): every rank must run backward through the same parameters"
                )
        raise RankDisagreement("DistMuon ranks disagree on which parameters have gradients")

    def _name_of(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for q, name in zip(group["params"], self._names(group, gi)):
                if q is p:
                    return name
        return "a parameter"

    def _adamw_step(self, group: dict, lr: float, has_grad: dict[int, bool]) -> None:
        params = [p for p in group["params"] if has_grad[id(p)]]
        if not params:
            return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        group_adamw_(
            [comm.local_tensor(p) for p in params],
            [comm.local_tensor(p.grad) for p in params],
            [comm.local_tensor(s["exp_avg"]) for s in states],
            [comm.local_tensor(s["exp_avg_sq"]) for s in states],
            [s["step"] for s in states],
            self._scratch, beta1=beta1, beta2=beta2, lr=lr, weight_decay=group["weight_decay"], eps=group["eps"],
        )

    def _muon_inputs(self, entries, has_grad: dict[int, bool], lrs: list[float]) -> list[torch.Tensor]:
        """Momentum, Nesterov and weight decay, one foreach op per group; returns each matrix
        parameter's local NS input. Nesterov is formed in place in the gradient's storage (as in
        modded-nanogpt): after ``step()`` a Muon gradient holds ``g.lerp(buf, momentum)``."""
        inputs: list[Optional[torch.Tensor]] = [None] * len(entries)
        by_group: dict[int, list[int]] = {}
        for pi, (gi, group, p, name) in enumerate(entries):
            if not has_grad[id(p)]:  # no update (as torch.optim); the plan still moves it, muted
                inputs[pi] = comm.local_tensor(self.state[p]["momentum_buffer"])
            elif group["algorithm"] == "muown":
                inputs[pi] = self._muown_start(group, p, name, self._muown_updates[pi])
            else:
                by_group.setdefault(gi, []).append(pi)
        for gi, members in by_group.items():
            group = self.param_groups[gi]
            params = [entries[pi][2] for pi in members]
            bufs = [comm.local_tensor(self.state[p]["momentum_buffer"]) for p in params]
            grads = [comm.local_tensor(p.grad) for p in params]
            decay = 1.0 - lrs[gi] * group["weight_decay"]
            if has_adamw_blocks(group):
                ns_inputs = mixed_step_(group, [comm.local_tensor(p) for p in params], grads,
                                        [self.state[p] for p in params], [self._local_rows[pi] for pi in members],
                                        decay, self._scratch)
            else:
                ns_inputs = group_momentum_([comm.local_tensor(p) for p in params], grads, bufs, group["momentum"],
                                            group["nesterov"], decay, self._scratch)
            for pi, t in zip(members, ns_inputs):
                inputs[pi] = t
        return inputs

    # ------------------------------------------------------------------ Muown

    def _muown_start(self, group: dict, p: torch.Tensor, name: str, update: torch.Tensor) -> torch.Tensor:
        """Decompose W, update the direction's momentum; returns the local NS input, zeroes ``update``."""
        state = self.state[p]
        dims = view_of(group, p, name).row_norm_dims
        v, grad_g, grad_v = muown_math.decompose(
            p.float(), p.grad.float(), state["magnitude"], state["direction_norm"], dims
        )
        state["_direction"], state["_grad_magnitude"] = v, _settled(grad_g)
        u = momentum_one_(state["momentum_buffer"], _settled(grad_v), group["momentum"], group["nesterov"], p)
        update.zero_()
        return comm.local_tensor(u)

    def _muown_finish(self, group: dict, lr: float, p: torch.Tensor, name: str, update_local: torch.Tensor) -> None:
        """v ← v − lr·s·O; g ← Adam(g); W ← g·v/‖v‖; decoupled weight decay on W (g re-synced)."""
        state = self.state[p]
        dims = view_of(group, p, name).row_norm_dims
        v, grad_g = state.pop("_direction"), state.pop("_grad_magnitude")
        update = _like(p, update_local)
        wd = group["weight_decay"]
        v_new = v - lr * update
        state["step"] += 1
        g = state["magnitude"]
        g.sub_(lr * _settled(muown_math.adam_direction(
            grad_g, state["magnitude_exp_avg"], state["magnitude_exp_avg_sq"], int(state["step"].item()),
            group["betas"], group["eps"],
        )))
        W_old = p.detach().float() if wd else None
        W_new, v_norm = muown_math.recompose(g, v_new, dims)
        state["direction_norm"].copy_(_settled(v_norm))
        if wd:
            W_new = W_new - lr * wd * W_old
            g.copy_(_settled(muown_math.row_norms(W_new, dims)))
        p.copy_(W_new.to(p.dtype))

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim`` semantics (the saved param-group hyperparameters win), after validation.

        Raises ValueError naming the parameter when the saved state does not fit this optimizer:
        different groups, parameter names, algorithm (routing) or view options, missing state,
        different state keys or shapes. Nothing is loaded unless everything fits.
        """
        from ..checkpoint import check_optimizer_state_dict

        check_optimizer_state_dict(self, state_dict)
        # torch.optim casts every floating state tensor to its parameter's dtype, which would turn
        # Muown's fp32 statistics of a bf16 parameter into bf16. State is created eagerly, so the
        # live state says each tensor's dtype: tensors torch would cast wrongly are loaded here.
        own_dtype = self._state_kept_out_of_torch_cast(state_dict)
        stripped = {pid: {k: v for k, v in st.items() if (pid, k) not in own_dtype} for pid, st in state_dict["state"].items()}
        names = [g.get("param_names") for g in self.param_groups]
        state_dtypes = [g.get("state_dtype") for g in self.param_groups]
        super().load_state_dict({**state_dict, "state": stripped})
        for group, own, state_dtype in zip(self.param_groups, names, state_dtypes):
            if own is not None:  # a stage keeps its own members' names
                group["param_names"] = own
            # How state is stored is this optimizer's choice (its tensors have that dtype): a run may
            # resume an fp32-state checkpoint with bf16 state, or the other way round.
            if state_dtype is None:
                group.pop("state_dtype", None)
            else:
                group["state_dtype"] = state_dtype
        for (_, key), (param, live_dtype, value) in own_dtype.items():
            self.state[param][key] = value.to(device=param.device, dtype=live_dtype)
        if self._graphed is not None:  # new state tensors: recapture on the addresses they have now
            self._graphed.release()
            self._graphed = GraphedMatrixStep(self, self._runner)

    def _state_kept_out_of_torch_cast(self, state_dict: dict) -> dict:
        """(saved param id, key) -> (param, dtype to keep, saved value) for floating state whose dtype
        differs from its parameter's."""
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        live_params = [p for g in self.param_groups for p in g["params"]]
        out = {}
        for pid, param in zip(saved_ids, live_params):
            for key, value in state_dict["state"].get(pid, {}).items():
                live = self.state[param].get(key)
                if (key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point()
                        and isinstance(live, torch.Tensor) and live.dtype != param.dtype):
                    out[(pid, key)] = (param, live.dtype, value)
        return out


def _settled(t: torch.Tensor) -> torch.Tensor:
    """Turn Partial placements (from reductions over a sharded dim) into Replicate."""
    if isinstance(t, DTensor) and any(isinstance(pl, Partial) for pl in t.placements):
        return t.redistribute(placements=[Replicate() if isinstance(pl, Partial) else pl for pl in t.placements])
    return t


def _zeros_like_layout(p: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``shape`` laid out like ``p`` (same mesh and placements), made without communication."""
    if isinstance(p, DTensor):
        from torch.distributed.tensor import zeros

        return zeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements)
    return torch.zeros(shape, dtype=dtype, device=p.device)


def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    if isinstance(p, DTensor):
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return local


def _digest(text: str) -> int:
    """A 62-bit digest (so it and its negation fit an int64) that is the same on every rank."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


def _describe_disagreement(records: list[dict]) -> str:
    """The first field where some rank differs from rank 0, named precisely."""
    reference = records[0]
    for rank, record in enumerate(records):
        for key, ours in reference.items():
            theirs = record[key]
            if theirs == ours:
                continue
            prefix = f"DistMuon ranks disagree on {key}"
            if not isinstance(ours, list):
                return f"{prefix}: rank 0 has {ours} but rank {rank} has {theirs}"
            for i, (a, b) in enumerate(zip(ours, theirs)):
                if a == b:
                    continue
                if isinstance(a, dict):
                    field = next(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                    return (f"{prefix}[{i}] ({a['first parameter']}): {field} is {a.get(field)} on rank 0 "
                            f"but {b.get(field)} on rank {rank}")
                return f"{prefix}[{i}]: rank 0 has {a} but rank {rank} has {b}"
            return f"{prefix}: rank 0 has {len(ours)} entries but rank {rank} has {len(theirs)}"
    return "DistMuon ranks disagree on the optimizer configuration"
