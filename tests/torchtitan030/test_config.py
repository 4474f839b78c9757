"""torchtitan 0.3.0 in-process: our config registry, ``--optimizer.<field>`` overrides and their
validation, the container, the fused-QKV routing and the ``@override`` (single process, CPU)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import nn

import dist_muon as dm
import reference
from dist_muon.integrations import torchtitan as dm_titan
from dist_muon.integrations.torchtitan import config_registry, routing
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.config import ConfigManager
from torchtitan.config.override import OverrideConfig, apply_overrides
from torchtitan.models.common.attention import FusedQKVLinear
from torchtitan.models.common.linear import Linear
from torchtitan.models.llama3 import config_registry as llama3_registry

MODULE = "dist_muon.integrations.torchtitan"
REGISTRY = ["llama3_debug_cpu", "moe_debug_cpu", "llama3_8b", "deepseek_v3_16b", "deepseek_v3_671b"]
OVERRIDE = f"{MODULE}.override.dist_muon"


def parse(*cli: str, config: str = "llama3_debug_cpu"):
    return ConfigManager().parse_args(["--module", MODULE, "--config", config, *cli])


# ----------------------------------------------------------------------------- configs and CLI


@pytest.mark.parametrize("name", REGISTRY)
def test_registry_configs_parse_with_distmuon(name):
    config = parse(config=name)
    assert isinstance(config, dm_titan.DistMuonTrainer.Config)
    assert isinstance(config.optimizer, dm_titan.DistMuonContainer.Config)
    assert not config.optimizer.param_groups  # nothing per FQN: routing is inferred


def test_every_distmuon_argument_is_a_config_field():
    """Guards against the core growing a constructor argument the config cannot set."""
    cfg = dm_titan.DistMuonContainer.Config()
    covered = set(dm.integrations.torchtitan.options.distmuon_kwargs(
        cfg, adamw_betas=cfg.adamw_betas, adamw_eps=cfg.adamw_eps)) | {"bucket_bytes"}
    # qk_clip_heads come from the model (routing.py finds the attention layers), not from a field.
    wanted = set(inspect.signature(dm.DistMuon).parameters) - {"params", "params_or_groups", "process_group",
                                                                "qk_clip_heads"}
    assert wanted <= covered, f"DistMuon arguments without an optimizer field: {wanted - covered}"


def test_cli_overrides_every_field():
    rules = '[{"pattern": "attention\\\\.wo", "lr": 0.01}, ["norm", {"algorithm": "adamw"}]]'
    config = parse(
        "--optimizer.lr", "0.03", "--optimizer.momentum", "0.9", "--optimizer.no-nesterov",
        "--optimizer.weight_decay", "0.1", "--optimizer.ns_method", "quintic", "--optimizer.ns_steps", "6",
        "--optimizer.ns_dtype", "float32", "--optimizer.adjust_lr", "match_rms_adamw",
        "--optimizer.adamw_lr", "0.001", "--optimizer.adamw_weight_decay", "0.0",
        "--optimizer.adamw_betas", "0.8", "0.99", "--optimizer.adamw_eps", "1e-10",
        "--optimizer.owner_policy", "round_robin", "--optimizer.bucket_bytes", "1048576",
        "--optimizer.nonfinite_grad", "skip", "--optimizer.compile_ns", "--optimizer.rules", rules,
        "--optimizer.no-log_routing", "--optimizer.matrix_algorithm", "normuon", "--optimizer.attention_view", "heads",
        "--optimizer.normuon_beta2", "0.9", "--optimizer.normuon_eps", "1e-7", "--optimizer.cuda_graph",
        "--optimizer.state_dtype", "bfloat16",
        "--optimizer.qk_clip_threshold", "50", "--optimizer.qk_clip_alpha", "0.25",
    )
    opt = config.optimizer
    kwargs = dm_titan.options.distmuon_kwargs(opt, adamw_betas=opt.adamw_betas, adamw_eps=opt.adamw_eps)
    assert kwargs == dict(
        lr=0.03, momentum=0.9, nesterov=False, weight_decay=0.1, ns_method="quintic", ns_steps=6,
        ns_dtype="float32", adjust_lr="match_rms_adamw", adamw_lr=0.001, adamw_betas=(0.8, 0.99),
        adamw_eps=1e-10, adamw_weight_decay=0.0, owner_policy="round_robin", nonfinite_grad="skip",
        compile_ns=True, bucket_bytes=1048576, normuon_beta2=0.9, normuon_eps=1e-7, cuda_graph=True,
        state_dtype="bfloat16", qk_clip_threshold=50.0, qk_clip_alpha=0.25,
    )
    assert (opt.matrix_algorithm, opt.attention_view, opt.log_routing) == ("normuon", "heads", False)
    assert dm_titan.parse_rules(opt.rules) == [("attention\\.wo", {"lr": 0.01}), ("norm", {"algorithm": "adamw"})]


@pytest.mark.parametrize(
    "cli, field",
    [
        (["--optimizer.lr", "-1"], "lr"),
        (["--optimizer.momentum", "1.5"], "momentum"),
        (["--optimizer.adamw_betas", "0.9", "1.5"], "adamw_betas"),
        (["--optimizer.adamw_eps", "-1e-8"], "adamw_eps"),
        (["--optimizer.weight_decay", "-0.1"], "weight_decay"),
        (["--optimizer.ns_method", "newton"], "ns_method"),
        (["--optimizer.ns_steps", "0"], "ns_steps"),
        (["--optimizer.ns_dtype", "int8"], "ns_dtype"),
        (["--optimizer.adjust_lr", "sqrt"], "adjust_lr"),
        (["--optimizer.owner_policy", "random"], "owner_policy"),
        (["--optimizer.bucket_bytes", "0"], "bucket_bytes"),
        (["--optimizer.nonfinite_grad", "ignore"], "nonfinite_grad"),
        (["--optimizer.matrix_algorithm", "adam"], "matrix_algorithm"),
        (["--optimizer.attention_view", "rows"], "attention_view"),
        (["--optimizer.state_dtype", "int8"], "state_dtype"),
        (["--optimizer.implementation", "fused_opt_states_bf16"], "implementation"),
        (["--optimizer.rules", '[{"pattern": "(unclosed"}]'], "rules[0].pattern"),
        (["--optimizer.rules", '[{"pattern": "wq", "split_size": [1]}]'], "rules[0]"),
    ],
)
def test_invalid_values_name_the_field(cli, field, capsys):
    """The same messages as 0.2.2's [optimizer] section, at parse time (before any process group)."""
    with pytest.raises(SystemExit):
        parse(*cli)
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert f"[optimizer] {field}" in err, err


def test_unknown_optimizer_flag_names_it(capsys):
    with pytest.raises(SystemExit):
        parse("--optimizer.momentun", "0.9")
    assert "momentun" in capsys.readouterr().err


def test_param_groups_are_refused_with_the_rule_to_write_instead():
    with pytest.raises(dm_titan.ConfigError, match=r"\[optimizer\] param_groups: .*rules="):
        dm_titan.DistMuonContainer.Config(param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW")])


# ----------------------------------------------------------------------------- the container


def debug_model(name: str = "llama3_debug_cpu") -> nn.Module:
    config = getattr(config_registry, name)()
    torch.manual_seed(0)
    model = config.model_spec.model.build()
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


@pytest.mark.parametrize("name", ["llama3_debug_cpu", "moe_debug_cpu"])
def test_container_builds_one_distmuon_per_model_part(name):
    parts = [debug_model(name), debug_model(name)]  # e.g. two pipeline stages
    opts = dm_titan.DistMuonContainer.Config(lr=0.02, adamw_lr=0.004, log_routing=False).build(model_parts=parts)
    assert len(opts) == 2
    for part, opt in zip(parts, opts):
        assert isinstance(opt, dm.DistMuon)
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in part.parameters()}
        by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
        assert by_name["tok_embeddings.weight"]["algorithm"] == by_name["lm_head.weight"]["algorithm"] == "adamw"
        assert by_name["layers.0.attention.wo.weight"]["lr"] == 0.02 and by_name["norm.weight"]["lr"] == 0.004


def test_fused_wqkv_is_three_interleaved_matrices_and_heads_on_request():
    model = debug_model()
    wqkv = model.layers["0"].attention.qkv_linear
    hpk, hd = wqkv.heads_per_kv, wqkv.head_dim
    n_kv = wqkv.wqkv.weight.shape[0] // ((hpk + 2) * hd)
    for view, expected in (("qkv", {"split_sizes": (hpk * hd, hd, hd), "interleave": n_kv}),
                           ("heads", {"num_heads": n_kv * (hpk + 2)})):
        groups = routing.param_groups(model, rules=[], matrix_algorithm="muon", attention_view=view)
        group = next(g for g in groups if "layers.0.attention.qkv_linear.wqkv.weight" in g["param_names"])
        assert {k: group[k] for k in expected} == expected, view
    report = dm.routing_report(routing.param_groups(model, rules=[], matrix_algorithm="muon", attention_view="qkv"))
    assert re.search(r"qkv_linear\.wqkv\.weight .*1×256×256 \+ 2×256×256|3×256×256", report), report


class _GQA(nn.Module):
    """torchtitan 0.3.0's own fused projection, with GQA (heads_per_kv = 3) so Q, K, V differ in size."""

    def __init__(self, dim=24, n_heads=6, n_kv_heads=2, head_dim=4):
        super().__init__()
        self.qkv_linear = FusedQKVLinear.Config(
            head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
            wqkv=Linear.Config(in_features=dim, out_features=(n_heads + 2 * n_kv_heads) * head_dim)).build()
        torch.manual_seed(1)
        nn.init.normal_(self.qkv_linear.wqkv.weight)


def _deinterleave(w: torch.Tensor, hpk: int, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    blocks = w.reshape(-1, hpk + 2, hd, w.shape[-1])
    return (blocks[:, :hpk].reshape(-1, w.shape[-1]), blocks[:, hpk].reshape(-1, w.shape[-1]),
            blocks[:, hpk + 1].reshape(-1, w.shape[-1]))


def test_fused_wqkv_rows_are_what_the_module_uses_as_q_k_v():
    """Our reading of the interleave is the module's: x @ Qᵀ is the forward's q (and K, V)."""
    m = _GQA()
    x = torch.randn(1, 5, 24)
    with torch.no_grad():
        xq, xk, xv = m.qkv_linear(x)
    q, k, v = _deinterleave(m.qkv_linear.wqkv.weight.detach(), m.qkv_linear.heads_per_kv, m.qkv_linear.head_dim)
    for out, w in ((xq, q), (xk, k), (xv, v)):
        torch.testing.assert_close(out.reshape(1, 5, -1), x @ w.T)


def test_fused_wqkv_step_equals_separate_q_k_v_fp64():
    m = _GQA()
    hpk, hd = m.qkv_linear.heads_per_kv, m.qkv_linear.head_dim
    w0 = m.qkv_linear.wqkv.weight.detach().clone()
    grad = torch.randn_like(w0)
    groups = routing.param_groups(m, rules=[], matrix_algorithm="muon", attention_view="qkv")
    opt = dm.DistMuon(groups, lr=0.05, weight_decay=0.1, ns_dtype=torch.float32, momentum=0.9)
    m.qkv_linear.wqkv.weight.grad = grad.clone()
    opt.step()
    expected = []
    for p, g in zip(_deinterleave(w0, hpk, hd), _deinterleave(grad, hpk, hd)):  # separate wq/wk/wv, fp64
        new, _ = reference.muon_step64(p, g, torch.zeros_like(p), lr=0.05, momentum=0.9, nesterov=True,
                                       weight_decay=0.1, method="polar_express", adjust_lr="original",
                                       matrices=lambda u: [(slice(None), u)])
        expected.append(new)
    got = _deinterleave(m.qkv_linear.wqkv.weight.detach().double(), hpk, hd)
    for name, e, g, p in zip("qkv", expected, got, _deinterleave(w0, hpk, hd)):
        err = (g - e).norm() / (e - p.double()).norm()
        assert err < 1e-5, (name, float(err))


def test_a_checkpoint_older_than_a_group_key_still_loads():
    """torchtitan's loader wants every live group key in the checkpoint; an option added later
    (here: interleave) must not make older checkpoints unloadable."""
    model = debug_model()
    opts = dm_titan.DistMuonContainer.Config(log_routing=False).build(model_parts=[model])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opts.step()
    saved = opts.state_dict()
    old = {k: v for k, v in saved.items() if not k.endswith(".interleave")}
    assert len(old) < len(saved)
    fresh = dm_titan.DistMuonContainer.Config(log_routing=False).build(model_parts=[model])
    fresh.load_state_dict(old)
    reloaded = fresh.state_dict()
    assert reloaded.keys() == saved.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(reloaded[key], value), key
        else:
            assert reloaded[key] == value, key


# ----------------------------------------------------------------------------- @override


def test_override_puts_distmuon_into_a_stock_config():
    stock = llama3_registry.llama3_debugmodel()
    adamw = stock.optimizer.param_groups[0].optimizer_kwargs
    stock.override = OverrideConfig(imports=[(OVERRIDE, {"lr": 0.03, "attention_view": "heads"})])
    apply_overrides(stock.override, stock)
    opt = stock.optimizer
    assert type(opt) is dm_titan.DistMuonContainer.Config
    assert (opt.lr, opt.attention_view) == (0.03, "heads")
    assert (opt.adamw_lr, opt.adamw_betas, opt.adamw_eps, opt.adamw_weight_decay) == (
        adamw["lr"], tuple(adamw["betas"]), adamw["eps"], adamw["weight_decay"])
    assert not opt.param_groups


@pytest.mark.parametrize("kwargs, message", [({"momentun": 0.9}, r"\[optimizer\] momentun: not a DistMuon option"),
                                             ({"momentum": 2.0}, r"\[optimizer\] momentum: must be")])
def test_override_options_are_validated(kwargs, message):
    stock = llama3_registry.llama3_debugmodel()
    with pytest.raises(dm_titan.ConfigError, match=message):
        apply_overrides(OverrideConfig(imports=[(OVERRIDE, kwargs)]), stock)


def test_override_leaves_our_own_config_alone():
    """exact=True: a DistMuonContainer.Config (a subclass of the target) is not claimed again."""
    config = config_registry.llama3_debug_cpu()
    before = config.optimizer
    apply_overrides(OverrideConfig(imports=[OVERRIDE]), config)
    assert config.optimizer is before and isinstance(before, OptimizersContainer.Config)


def test_qk_clip_with_context_parallelism_is_refused_at_parse_time(capsys):
    """A CP rank holds only its chunk of the keys, so its max logits would be wrong: refused before
    any process group, naming the field and the fix; without τ, or with CP 1, the config parses."""
    cp = ("--parallelism.context_parallel_degree", "2")
    with pytest.raises((dm_titan.ConfigError, SystemExit)) as raised:
        parse("--optimizer.qk_clip_threshold", "50", *cp)
    message = " ".join((str(raised.value) + capsys.readouterr().err).replace("│", " ").split())
    assert "qk_clip_threshold" in message and "context_parallel_degree = 1" in message, message
    assert parse(*cp).parallelism.context_parallel_degree == 2
    assert parse("--optimizer.qk_clip_threshold", "50").optimizer.qk_clip_threshold == 50.0


def test_spmd_types_on_several_ranks_is_refused_at_parse_time(monkeypatch, capsys):
    """torch 2.13's FSDP2 cannot shard spmd_types' plain parameters: say what to use, before any
    process group (torchtitan itself would fail later with "Got plain tensor for parameter 'weight'")."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14):
        pytest.skip("torch >= 2.14 shards spmd_types parameters")
    # tyro reports the ConfigError raised in the config's __post_init__ itself (exit 2) or lets it
    # propagate, depending on where in its construction it is raised: either way before any process group.
    with pytest.raises((dm_titan.ConfigError, SystemExit)) as raised:
        parse("--parallelism.spmd_backend", "spmd_types")
    message = " ".join((str(raised.value) + capsys.readouterr().err).replace("│", " ").split())
    assert "[parallelism] spmd_backend: 'spmd_types'" in message and "full_dtensor" in message, message
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse("--parallelism.spmd_backend", "spmd_types").parallelism.spmd_backend == "spmd_types"


class _Axis:
    """Stands in for spmd_types' MeshAxis (only its size matters here)."""

    def __init__(self, name, size):
        self.name, self._size = name, size

    def size(self):
        return self._size

    def __str__(self):
        return self.name


def test_a_plain_spmd_types_shard_is_refused_naming_it():
    """A plain parameter spmd_types marks Varying (a shard) on a mesh axis of size > 1 is not the whole
    matrix: the container refuses it (Replicate / Invariant, or size-1 axes, are fine)."""
    from dist_muon.integrations.torchtitan.layouts import check_parameter_layouts
    from spmd_types.types import I, R, V

    model = nn.Sequential(nn.Linear(4, 8, bias=False))
    model[0].weight._local_type = {_Axis("tp", 2): R, _Axis("dp", 1): V, _Axis("ep", 4): I}
    check_parameter_layouts(model)
    model[0].weight._local_type = {_Axis("tp", 2): V}
    with pytest.raises(ValueError, match=r"0\.weight: a plain local tensor .* \['tp'\] .*full_dtensor"):
        check_parameter_layouts(model)
