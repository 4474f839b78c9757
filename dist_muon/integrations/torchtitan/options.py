"""DistMuon's torchtitan options, shared by the 0.2.2 and 0.3.0 adapters: the fields, their
validation (one message format for TOML, CLI and Python configs) and the DistMuon arguments.

Both adapters put ``DistMuonFields`` into their optimizer config dataclass:

* 0.2.2: ``[optimizer]`` (torchtitan's ``Optimizer`` keeps ``lr``, ``weight_decay``, ``beta1``,
  ``beta2`` and ``eps``; ``beta1``/``beta2``/``eps`` are AdamW's);
* 0.3.0: ``OptimizersContainer.Config`` (our subclass adds ``lr``, ``weight_decay``,
  ``adamw_betas`` and ``adamw_eps`` itself).

Nothing here imports torchtitan: the same checks run under either version.
"""

# No `from __future__ import annotations`: torchtitan (0.2.2's make_dataclass merge) and tyro
# resolve these field types at runtime.
import json
import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Mapping, NoReturn, Optional

import tyro

NAME = "DistMuon"
ATTENTION_VIEWS = ("qkv", "heads")


def _json_or_str(text: str) -> Any:
    """CLI values that look like JSON lists are parsed, anything else stays a string."""
    return json.loads(text) if text.lstrip().startswith("[") else text


def _cli_spec(metavar: str, parse, is_instance) -> tyro.constructors.PrimitiveConstructorSpec:
    # tyro cannot parse lists of tables from the command line; these fields take JSON there
    # (TOML and Python configs give them natively) and show as JSON in --help.
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1,
        metavar=metavar,
        instance_from_str=lambda args: parse(args[0]),
        is_instance=is_instance,
        str_from_instance=lambda value: [value if isinstance(value, str) else json.dumps(value)],
    )


RoutingRules = Annotated[list, _cli_spec("JSON", json.loads, lambda v: isinstance(v, list))]
NsMethod = Annotated[str | list, _cli_spec("NAME|JSON", _json_or_str, lambda v: isinstance(v, (str, list)))]


@dataclass(kw_only=True)
class DistMuonFields:
    """DistMuon's optimizer fields, the same in both torchtitan versions (each has a DistMuon
    argument of the same name unless said otherwise)."""

    momentum: float = 0.95
    """Muon momentum (EMA coefficient of the gradient)."""

    nesterov: bool = True
    """Use Nesterov momentum for Muon."""

    ns_method: NsMethod = "polar_express"
    """Newton–Schulz schedule: "polar_express", "quintic", or a list of [a, b, c] triples."""

    ns_steps: int = 5
    """Newton–Schulz iterations (the list length for a custom schedule)."""

    ns_dtype: str = "auto"
    """Newton–Schulz compute dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float32" or "float16"."""

    matrix_algorithm: str = "muon"
    """Algorithm of the weight matrices no rule routes: "muon", "normuon" (Muon with NorMuon's per-row
    second-moment normalisation) or "muown". Embeddings, the output head and vectors stay AdamW."""

    attention_view: str = "qkv"
    """How attention projections are cut into matrices: "qkv" (Q, K and V each one whole matrix, also
    out of a fused, interleaved wqkv) or "heads" (every head its own matrix)."""

    normuon_beta2: float = 0.95
    """NorMuon: EMA coefficient of the per-row second moment of the orthogonalized update."""

    normuon_eps: float = 1e-8
    """NorMuon: added to the per-row RMS before dividing."""

    adjust_lr: str = "original"
    """Per-matrix lr scale: "original" (sqrt(max(1, m/n))), "match_rms_adamw" (0.2*sqrt(max(m, n))) or "none"."""

    adamw_lr: Optional[float] = None
    """lr of the AdamW-routed parameters (embeddings, output head, norms, biases); default: lr."""

    adamw_weight_decay: Optional[float] = None
    """Weight decay of the AdamW-routed parameters; default: weight_decay."""

    owner_policy: str = "balanced"
    """How matrices are assigned to owner ranks: "balanced" (by NS cost) or "round_robin"."""

    bucket_bytes: Optional[int] = None
    """Budget (bytes) of whole matrices a rank assembles at once; default: DistMuon's (512 MiB)."""

    nonfinite_grad: str = "raise"
    """On inf/NaN gradients: "raise" or "skip" (skip the whole step with a warning)."""

    compile_ns: bool = False
    """torch.compile the torch Newton–Schulz loop (the CUDA Triton kernels are used either way)."""

    cuda_graph: bool = False
    """Run the Muon/NorMuon part of each step as a captured CUDA graph (lr and weight decay stay live)."""

    state_dtype: Optional[str] = None
    """dtype of the momentum buffers and AdamW moments: "bfloat16" (half the state memory of fp32
    parameters; the math stays fp32, the state is rounded once per step), "float16", "float32" or
    "float64"; unset: each parameter's own dtype. A rule may set it per group."""

    qk_clip_threshold: Optional[float] = None
    """QK-clip (MuonClip) threshold τ: after each step, every attention head whose largest pre-softmax
    logit q·k·scale in the step's forward exceeded τ has its query/key weights scaled so its logits
    shrink by τ/S_max (llama3 GQA, fused wqkv, deepseek_v3 MLA; docs/qk_clip.md). Unset: off (no
    hook, nothing computed). Kimi K2 used 100."""

    qk_clip_alpha: float = 0.5
    """QK-clip: the query's share α of the scaling (query by γ^α, key by γ^(1−α)); in [0, 1]."""

    qk_clip_chunk: int = 128
    """QK-clip: keys per chunk when the forward hook computes the max logit (memory ∝ seq × chunk)."""

    rules: RoutingRules = field(default_factory=list)
    """Routing rules, first match wins: a list of tables {pattern = REGEX, <option> = value, ...}
    (or [REGEX, {options}] pairs) matched with re.search against parameter FQNs. Options:
    algorithm ("muon" | "normuon" | "adamw" | "muown"), view options (num_experts, split_sizes,
    interleave, num_heads, flatten) and per-group hyperparameters (lr, weight_decay, momentum, betas,
    eps, ...). On the command line: JSON."""

    log_routing: bool = True
    """Log DistMuon's routing report (where every parameter goes) on rank 0 at start-up."""

    on_routing_change: str = "refuse"
    """On resume, a parameter whose checkpoint state is another algorithm's (an AdamW run, DistMuon
    routed differently): "refuse" (stop before loading, naming it), "reset" (fresh state for it) or
    "convert" (Muon momentum from AdamW's exp_avg and back; docs/checkpointing.md#warm-starts).
    Not a DistMuon argument: the pre-load check of the trainer applies it."""


class ConfigError(ValueError):
    """An invalid optimizer setting; the message names the field."""


def fail(name: str, message: str) -> NoReturn:
    raise ConfigError(f"[optimizer] {name}: {message}")


# ----------------------------------------------------------------------------- type checks


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(cfg, name: str, low: float, high: float = math.inf, *, optional: bool = False,
                 high_open: bool = False, integer: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if not _is_number(value) or (integer and not isinstance(value, int)):
        fail(name, f"expected {kind}, got {value!r} ({type(value).__name__})")
    if value < low or value > high or (high_open and value == high):
        upper = ("" if high == math.inf else f" and {'<' if high_open else '<='} {high}")
        fail(name, f"must be >= {low}{upper}, got {value!r}")


def check_betas(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(b) for b in value)):
        fail(name, f"expected a pair of numbers [beta1, beta2], got {value!r}")
    for b in value:
        if not 0 <= b < 1:
            fail(name, f"each beta must be >= 0 and < 1, got {value!r}")


def _check_bool(cfg, name: str) -> None:
    if not isinstance(getattr(cfg, name), bool):
        fail(name, f"expected true or false, got {getattr(cfg, name)!r}")


def _check_choice(cfg, name: str, choices) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        fail(name, f"must be one of {list(choices)}, got {value!r}")


# ----------------------------------------------------------------------------- validation


def _core_choices() -> dict[str, tuple]:
    """Allowed string values, taken from the core so the two cannot drift apart."""
    from dist_muon.numerics import NAMED_METHODS
    from dist_muon.optimizer.groups import MATRIX_ALGORITHMS, NONFINITE_POLICIES
    from dist_muon.plan import OWNER_POLICIES
    from dist_muon.views import ADJUST_LR
    from dist_muon.warm_start import MODES

    return {
        "on_routing_change": MODES,
        "matrix_algorithm": MATRIX_ALGORITHMS,
        "attention_view": ATTENTION_VIEWS,
        "ns_method": NAMED_METHODS,
        "adjust_lr": tuple("none" if a is None else a for a in ADJUST_LR),
        "owner_policy": OWNER_POLICIES,
        "nonfinite_grad": NONFINITE_POLICIES,
    }


def _check_schedule(cfg, choices: Mapping[str, tuple]) -> None:
    from dist_muon.numerics import check_ns_dtype, resolve_schedule

    check_number(cfg, "ns_steps", 1, integer=True)
    if isinstance(cfg.ns_method, str):
        _check_choice(cfg, "ns_method", choices["ns_method"])
    try:
        resolve_schedule(cfg.ns_method, cfg.ns_steps)
    except (TypeError, ValueError) as e:
        fail("ns_method", str(e))
    if not isinstance(cfg.ns_dtype, str):
        fail("ns_dtype", f"expected a dtype name such as \"bfloat16\", got {cfg.ns_dtype!r}")
    try:
        check_ns_dtype(cfg.ns_dtype)
    except (TypeError, ValueError) as e:
        fail("ns_dtype", str(e))


def validate_fields(cfg) -> None:
    """Check every ``DistMuonFields`` field and ``lr`` / ``weight_decay``; raises ConfigError naming
    the first bad field. Each adapter checks its AdamW betas/eps fields itself."""
    choices = _core_choices()
    check_number(cfg, "lr", 0)
    check_number(cfg, "weight_decay", 0)
    for name in ("momentum", "normuon_beta2"):
        check_number(cfg, name, 0, 1, high_open=True)
    check_number(cfg, "normuon_eps", 0)
    check_number(cfg, "adamw_lr", 0, optional=True)
    check_number(cfg, "adamw_weight_decay", 0, optional=True)
    check_number(cfg, "bucket_bytes", 1, optional=True, integer=True)
    check_number(cfg, "qk_clip_threshold", 0, optional=True)
    if cfg.qk_clip_threshold is not None and cfg.qk_clip_threshold <= 0:
        fail("qk_clip_threshold", f"must be > 0 (e.g. 100), or unset to turn QK-clip off; got {cfg.qk_clip_threshold!r}")
    check_number(cfg, "qk_clip_alpha", 0, 1)
    check_number(cfg, "qk_clip_chunk", 1, integer=True)
    for name in ("nesterov", "compile_ns", "cuda_graph", "log_routing"):
        _check_bool(cfg, name)
    for name in ("matrix_algorithm", "attention_view", "adjust_lr", "owner_policy", "nonfinite_grad",
                 "on_routing_change"):
        _check_choice(cfg, name, choices[name])
    _check_schedule(cfg, choices)
    _check_state_dtype(cfg)
    parse_rules(cfg.rules)


def _check_state_dtype(cfg) -> None:
    from dist_muon.optimizer.state_dtype import check_state_dtype

    if cfg.state_dtype is not None and not isinstance(cfg.state_dtype, str):
        fail("state_dtype", f"expected a dtype name such as \"bfloat16\", got {cfg.state_dtype!r}")
    try:
        check_state_dtype(cfg.state_dtype, "state_dtype")
    except ValueError as e:
        fail("state_dtype", str(e).removeprefix("state_dtype: "))


def check_qk_clip_parallelism(cfg, parallel_dims, *, context_parallel: bool) -> None:
    """QK-clip's layouts: FSDP, HSDP, TP, PP and EP are supported, and context parallelism where
    ``context_parallel`` (torchtitan 0.2.2 with SDPA: the hook gathers the keys over the CP ranks;
    not with PP, whose later stages do not receive the positions). Pure DDP is refused in 0.2.2
    (plain replicated parameters, which each replica would clip with its own maxima)."""
    if getattr(cfg, "qk_clip_threshold", None) is None or parallel_dims is None:
        return
    if parallel_dims.cp_enabled and not context_parallel:
        fail("qk_clip_threshold", "QK-clip supports context parallelism in torchtitan 0.2.2 only (0.3.0's attention "
                                  "gathers the keys after the max-logit hook); unset it or set "
                                  "context_parallel_degree = 1")
    if parallel_dims.cp_enabled and parallel_dims.pp_enabled:
        fail("qk_clip_threshold", "QK-clip does not support context and pipeline parallelism together (later stages "
                                  "receive no token positions); unset it, or set context_parallel_degree = 1 or "
                                  "pipeline_parallel_degree = 1")
    if parallel_dims.dp_replicate_enabled and not parallel_dims.fsdp_enabled:
        fail("qk_clip_threshold", "QK-clip does not support pure DDP (data_parallel_replicate_degree > 1 without "
                                  "sharding); use HSDP (data_parallel_shard_degree > 1) or FSDP")


def parse_rules(rules) -> list[tuple[str, dict]]:
    """TOML/JSON/Python rules -> ``dm.build_param_groups`` rules: [(regex, options), ...]."""
    from dist_muon.routing import check_group_keys

    if isinstance(rules, str):
        try:
            rules = json.loads(rules) if rules.strip() else []
        except json.JSONDecodeError as e:
            fail("rules", f"not valid JSON: {e}")
    if not isinstance(rules, (list, tuple)):
        fail("rules", f"expected a list of rules, got {rules!r}")
    parsed = []
    for i, rule in enumerate(rules):
        pattern, options = _split_rule(i, rule)
        try:
            re.compile(pattern)
        except re.error as e:
            fail(f"rules[{i}].pattern", f"invalid regex {pattern!r}: {e}")
        if "params" in options or "param_names" in options:
            fail(f"rules[{i}]", "a rule cannot set 'params' or 'param_names'")
        try:
            check_group_keys(options, f"[optimizer] rules[{i}] ({pattern!r})")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        parsed.append((pattern, options))
    return parsed


def _split_rule(i: int, rule) -> tuple[str, dict]:
    if isinstance(rule, Mapping):
        options = dict(rule)
        pattern = options.pop("pattern", None)
    elif isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[1], Mapping):
        pattern, options = rule[0], dict(rule[1])
    else:
        fail(f"rules[{i}]", f"expected {{pattern = REGEX, ...options}} or [REGEX, {{options}}], got {rule!r}")
    if not isinstance(pattern, str):
        fail(f"rules[{i}].pattern", f"expected a regex string, got {pattern!r}")
    return pattern, options


# ----------------------------------------------------------------------------- DistMuon arguments


def distmuon_kwargs(cfg, *, adamw_betas: tuple[float, float], adamw_eps: float) -> dict[str, Any]:
    """Keyword arguments for ``dist_muon.DistMuon`` (everything but the param groups); each adapter
    says where AdamW's betas and eps come from."""
    kwargs = dict(
        lr=float(cfg.lr),
        momentum=float(cfg.momentum),
        nesterov=cfg.nesterov,
        weight_decay=float(cfg.weight_decay),
        ns_method=cfg.ns_method,
        ns_steps=cfg.ns_steps,
        ns_dtype=cfg.ns_dtype,
        adjust_lr=None if cfg.adjust_lr == "none" else cfg.adjust_lr,
        adamw_lr=None if cfg.adamw_lr is None else float(cfg.adamw_lr),
        adamw_betas=(float(adamw_betas[0]), float(adamw_betas[1])),
        adamw_eps=float(adamw_eps),
        adamw_weight_decay=None if cfg.adamw_weight_decay is None else float(cfg.adamw_weight_decay),
        normuon_beta2=float(cfg.normuon_beta2),
        normuon_eps=float(cfg.normuon_eps),
        owner_policy=cfg.owner_policy,
        nonfinite_grad=cfg.nonfinite_grad,
        compile_ns=cfg.compile_ns,
        cuda_graph=cfg.cuda_graph,
        state_dtype=cfg.state_dtype,
        qk_clip_threshold=None if cfg.qk_clip_threshold is None else float(cfg.qk_clip_threshold),
        qk_clip_alpha=float(cfg.qk_clip_alpha),
    )
    if cfg.bucket_bytes is not None:
        kwargs["bucket_bytes"] = cfg.bucket_bytes
    return kwargs
