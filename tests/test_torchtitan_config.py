"""The torchtitan plugin in-process (fast): TOML/CLI config, validation, builders, LR resume, shims."""

from __future__ import annotations

import copy
import inspect
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchtitan")

import dist_muon as dm  # noqa: E402
from dist_muon.integrations import torchtitan as dm_titan  # noqa: E402
from harness import TEST_TIMEOUT  # noqa: E402  (the overall limit, raisable by env; never a speed assumption)
from launch import cpu_shims  # noqa: E402
from launch.train import parse_config  # noqa: E402
from torchtitan.components.lr_scheduler import LRSchedulersContainer, build_lr_schedulers  # noqa: E402
from torchtitan.components.optimizer import OptimizersContainer  # noqa: E402
from torchtitan.config import JobConfig, LRScheduler as LRSchedulerConfig  # noqa: E402
from torchtitan.protocols.train_spec import get_train_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))
DEBUG = REPO / "configs" / "debug_cpu.toml"


def parse(*cli: str, toml: str | None = None, tmp_path: Path | None = None):
    config = DEBUG
    if toml is not None:
        config = tmp_path / "job.toml"
        config.write_text(toml)
    return parse_config(["--job.config_file", str(config), *cli])


def debug_toml_with(line: str) -> str:
    """The debug config with ``line`` ("key = value") set in its [optimizer] table."""
    key = line.split("=")[0].strip()
    text = "\n".join(x for x in DEBUG.read_text().splitlines() if not re.match(rf"{key}\s*=", x))
    return text.replace('name = "DistMuon"', f'name = "DistMuon"\n{line}')


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_and_validate(path):
    config = parse_config(["--job.config_file", str(path)])
    assert config.optimizer.name == "DistMuon"
    dm_titan.validate(config.optimizer)
    assert get_train_spec(config.model.name).model_args[config.model.flavor] is not None


def test_every_distmuon_argument_is_a_config_field():
    """Guards against the core growing a constructor argument the TOML cannot set."""
    covered = set(dm_titan.distmuon_kwargs(dm_titan.DistMuonOptimizer(name="DistMuon"))) | {"bucket_bytes"}
    # qk_clip_heads come from the model (routing.py finds the attention layers), not from a field.
    wanted = set(inspect.signature(dm.DistMuon).parameters) - {"params", "params_or_groups", "process_group",
                                                                "qk_clip_heads"}
    assert wanted <= covered, f"DistMuon arguments without an [optimizer] field: {wanted - covered}"


def test_cli_overrides_every_field():
    rules = '[{"pattern": "attention\\\\.wq", "lr": 0.01}, ["norm", {"algorithm": "adamw"}]]'
    config = parse(
        "--optimizer.lr", "0.03", "--optimizer.momentum", "0.9", "--optimizer.no-nesterov",
        "--optimizer.weight_decay", "0.1", "--optimizer.ns_method", "quintic", "--optimizer.ns_steps", "6",
        "--optimizer.ns_dtype", "float32", "--optimizer.adjust_lr", "match_rms_adamw",
        "--optimizer.adamw_lr", "0.001", "--optimizer.adamw_weight_decay", "0.0",
        "--optimizer.beta1", "0.8", "--optimizer.beta2", "0.99", "--optimizer.eps", "1e-10",
        "--optimizer.owner_policy", "round_robin", "--optimizer.bucket_bytes", "1048576",
        "--optimizer.nonfinite_grad", "skip", "--optimizer.compile_ns", "--optimizer.rules", rules,
        "--optimizer.no-log_routing", "--optimizer.matrix_algorithm", "normuon",
        "--optimizer.normuon_beta2", "0.9", "--optimizer.normuon_eps", "1e-7", "--optimizer.cuda_graph",
        "--optimizer.state_dtype", "bfloat16",
        "--optimizer.qk_clip_threshold", "50", "--optimizer.qk_clip_alpha", "0.25", "--optimizer.qk_clip_chunk", "64",
    )
    assert dm_titan.distmuon_kwargs(config.optimizer) == dict(
        lr=0.03, momentum=0.9, nesterov=False, weight_decay=0.1, ns_method="quintic", ns_steps=6,
        ns_dtype="float32", adjust_lr="match_rms_adamw", adamw_lr=0.001, adamw_betas=(0.8, 0.99),
        adamw_eps=1e-10, adamw_weight_decay=0.0, owner_policy="round_robin", nonfinite_grad="skip",
        compile_ns=True, bucket_bytes=1048576, normuon_beta2=0.9, normuon_eps=1e-7, cuda_graph=True,
        state_dtype="bfloat16",
        qk_clip_threshold=50.0, qk_clip_alpha=0.25,
    )
    assert config.optimizer.qk_clip_chunk == 64
    assert config.optimizer.matrix_algorithm == "normuon"
    assert dm_titan.parse_rules(config.optimizer.rules) == [("attention\\.wq", {"lr": 0.01}),
                                                            ("norm", {"algorithm": "adamw"})]
    assert config.optimizer.log_routing is False


def test_custom_ns_schedule_and_adjust_lr_none(tmp_path):
    config = parse("--optimizer.adjust_lr", "none", "--optimizer.ns_steps", "2",
                   toml=debug_toml_with("ns_method = [[3.4445, -4.775, 2.0315], [3.4445, -4.775, 2.0315]]"),
                   tmp_path=tmp_path)
    kwargs = dm_titan.distmuon_kwargs(config.optimizer)
    assert kwargs["adjust_lr"] is None and len(kwargs["ns_method"]) == 2


def test_rules_toml_tables_and_pairs(tmp_path):
    toml = debug_toml_with(
        "rules = [['wqkv', {split_sizes = [256, 64, 64]}], {pattern = 'experts', num_experts = 8}]"
    )
    config = parse(toml=toml, tmp_path=tmp_path)
    assert dm_titan.parse_rules(config.optimizer.rules) == [
        ("wqkv", {"split_sizes": [256, 64, 64]}), ("experts", {"num_experts": 8})]


def test_unknown_optimizer_field_in_toml_names_it(tmp_path):
    with pytest.raises(ValueError, match="not_a_distmuon_field"):
        parse(toml=debug_toml_with("not_a_distmuon_field = 1"), tmp_path=tmp_path)


def test_unknown_optimizer_flag_on_cli_names_it(capsys):
    with pytest.raises(SystemExit):
        parse("--optimizer.not_a_distmuon_field", "1")
    assert "not_a_distmuon_field" in capsys.readouterr().err.replace("-", "_")


@pytest.mark.parametrize(
    "cli, field",
    [
        (["--optimizer.lr", "-1"], "lr"),
        (["--optimizer.momentum", "1.0"], "momentum"),
        (["--optimizer.beta2", "1.5"], "beta2"),
        (["--optimizer.eps", "-1e-8"], "eps"),
        (["--optimizer.weight_decay", "-0.1"], "weight_decay"),
        (["--optimizer.ns_method", "newton"], "ns_method"),
        (["--optimizer.ns_method", "[[1, 2]]"], "ns_method"),
        (["--optimizer.ns_steps", "0"], "ns_steps"),
        (["--optimizer.ns_dtype", "int8"], "ns_dtype"),
        (["--optimizer.adjust_lr", "sqrt"], "adjust_lr"),
        (["--optimizer.adamw_lr", "-0.1"], "adamw_lr"),
        (["--optimizer.adamw_weight_decay", "-1"], "adamw_weight_decay"),
        (["--optimizer.owner_policy", "random"], "owner_policy"),
        (["--optimizer.bucket_bytes", "0"], "bucket_bytes"),
        (["--optimizer.nonfinite_grad", "ignore"], "nonfinite_grad"),
        (["--optimizer.matrix_algorithm", "adam"], "matrix_algorithm"),
        (["--optimizer.normuon_beta2", "1.0"], "normuon_beta2"),
        (["--optimizer.state_dtype", "int8"], "state_dtype"),
        (["--optimizer.qk_clip_threshold", "0"], "qk_clip_threshold"),
        (["--optimizer.qk_clip_threshold", "-5"], "qk_clip_threshold"),
        (["--optimizer.qk_clip_alpha", "1.5"], "qk_clip_alpha"),
        (["--optimizer.qk_clip_chunk", "0"], "qk_clip_chunk"),
        (["--optimizer.early_step_in_backward"], "early_step_in_backward"),
        (["--optimizer.rules", '[{"pattern": "(unclosed"}]'], "rules[0].pattern"),
        (["--optimizer.rules", '[{"pattern": "wq", "split_size": [1]}]'], "rules[0]"),
        (["--optimizer.rules", '[{"algorithm": "adamw"}]'], "rules[0].pattern"),
        (["--optimizer.rules", '[{"pattern": "wq", "params": []}]'], "rules[0]"),
    ],
)
def test_invalid_values_name_the_field(cli, field):
    with pytest.raises(dm_titan.ConfigError, match=re.escape(f"[optimizer] {field}")):
        parse(*cli)


@pytest.mark.parametrize("line, field", [('momentum = "high"', "momentum"), ("nesterov = 1", "nesterov"),
                                         ('compile_ns = "yes"', "compile_ns"),
                                         ("ns_steps = 2.5", "ns_steps"), ("rules = 3", "rules")])
def test_toml_values_are_type_checked(tmp_path, line, field):
    with pytest.raises(dm_titan.ConfigError, match=rf"\[optimizer\] {field}:"):
        parse(toml=debug_toml_with(line), tmp_path=tmp_path)


# ----------------------------------------------------------------------------- builders


def tiny_model(name: str, flavor: str = "debugmodel") -> torch.nn.Module:
    """The flavor with 2 layers (for deepseek_v3: one dense, one MoE), built and initialised on CPU."""
    spec = get_train_spec(name)
    args = copy.deepcopy(spec.model_args[flavor])
    args.n_layers = 2
    args.update_from_config(JobConfig())  # as the Trainer does (sets e.g. deepseek's moe_impl)
    torch.manual_seed(0)
    model = spec.model_cls(args)
    with torch.no_grad():
        model.init_weights(buffer_device=None) if name != "llama3" else model.init_weights()
    return model


def optimizer_config(**fields):
    return dm_titan.DistMuonOptimizer(name="DistMuon", lr=0.02, adamw_lr=0.004, log_routing=False, **fields)


NO_MESHES = SimpleNamespace(get_optional_mesh=lambda name: None, ep_enabled=False, pp_enabled=False)


@pytest.mark.parametrize("model_name", ["llama3", "qwen3", "deepseek_v3"])
def test_train_spec_builds_one_distmuon_per_model_part(model_name):
    dm_titan.register(model_name)
    spec = get_train_spec(model_name)
    parts = [tiny_model(model_name), tiny_model(model_name)]  # e.g. two pipeline stages
    container = spec.build_optimizers_fn(parts, optimizer_config(), NO_MESHES)
    assert isinstance(container, dm_titan.DistMuonOptimizersContainer) and len(container) == 2
    for part, opt in zip(parts, container):
        assert isinstance(opt, dm.DistMuon)
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in part.parameters()}
        algorithms = {g["algorithm"]: g["lr"] for g in opt.param_groups}
        assert algorithms == {"muon": 0.02, "adamw": 0.004}


def test_matrix_algorithm_normuon_routes_the_weight_matrices():
    dm_titan.register("llama3")
    part = tiny_model("llama3")
    container = get_train_spec("llama3").build_optimizers_fn(
        [part], optimizer_config(matrix_algorithm="normuon", normuon_beta2=0.9), NO_MESHES)
    (opt,) = container
    assert {g["algorithm"] for g in opt.param_groups} == {"normuon", "adamw"}
    assert all(g["beta2"] == 0.9 for g in opt.param_groups if g["algorithm"] == "normuon")


def test_other_optimizer_names_use_torchtitan():
    dm_titan.register("llama3")
    config = optimizer_config()
    config.name, config.implementation = "AdamW", "for-loop"
    container = get_train_spec("llama3").build_optimizers_fn([tiny_model("llama3")], config, NO_MESHES)
    assert type(container) is OptimizersContainer and isinstance(container.optimizers[0], torch.optim.AdamW)


def test_moe_load_balancing_hook_is_kept(monkeypatch):
    """deepseek_v3's builder registers the expert-bias update as a step pre-hook; it must still run."""
    monkeypatch.setattr(torch, "histc", torch.histc)  # restored after the test
    cpu_shims.integer_histc()  # the MoE router's histc on int64 (CPU)
    dm_titan.register("deepseek_v3")
    model = tiny_model("deepseek_v3")
    config = optimizer_config(ns_steps=1)  # the hook is under test, not Newton–Schulz
    container = get_train_spec("deepseek_v3").build_optimizers_fn([model], config, NO_MESHES)
    assert container._optimizer_step_pre_hooks, "the MoE load-balancing hook was dropped"
    moe = model.layers["1"].moe
    bias_before = moe.expert_bias.clone()
    model(torch.randint(0, 2048, (1, 16))).float().mean().backward()
    assert moe.tokens_per_expert.sum() > 0
    container.step()
    assert moe.tokens_per_expert.sum() == 0 and not torch.equal(moe.expert_bias, bias_before)


def test_routing_rules_reach_the_param_groups():
    config = optimizer_config(rules=[{"pattern": r"feed_forward\.w2", "lr": 0.01},
                                     {"pattern": r"attention\.wo", "algorithm": "adamw"}])
    opt = dm_titan.build_dist_muon_optimizers([tiny_model("llama3")], config, NO_MESHES).optimizers[0]
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by_name["layers.0.feed_forward.w2.weight"]["lr"] == 0.01
    assert by_name["layers.0.attention.wo.weight"]["algorithm"] == "adamw"
    assert by_name["layers.0.attention.wq.weight"]["lr"] == 0.02


# ----------------------------------------------------------------------------- LR schedulers across resume


def stage_optimizers(stage: int):
    """Pipeline-stage-like parts with different param-group structures (stage 0 has an extra group)."""
    model = tiny_model("llama3")
    rules = [{"pattern": "tok_embeddings", "algorithm": "adamw", "lr": 0.01}] if stage == 0 else []
    return dm_titan.build_dist_muon_optimizers([model], optimizer_config(rules=rules), NO_MESHES)


def schedulers(optimizers, per_group: bool):
    config = LRSchedulerConfig(warmup_steps=2, decay_type="linear", min_lr_factor=0.1)
    if per_group:
        dm_titan.register("llama3")
        return get_train_spec("llama3").build_lr_schedulers_fn(optimizers, config, 20)
    return build_lr_schedulers(optimizers, config, 20)


def lrs(optimizers) -> list[float]:
    return [g["lr"] for g in optimizers.optimizers[0].param_groups]


def advance(scheds, steps: int) -> None:
    for _ in range(steps):
        scheds.step()


def test_each_group_resumes_with_its_own_lr():
    """torchtitan saves one scheduler's state (stage 0 on rank 0) and loads it everywhere."""
    saved_stage0, saved_stage1 = stage_optimizers(0), stage_optimizers(1)
    sched0, sched1 = schedulers(saved_stage0, True), schedulers(saved_stage1, True)
    assert isinstance(sched0, dm_titan.PerGroupLRSchedulersContainer)
    advance(sched0, 7)
    advance(sched1, 7)
    state = sched0.state_dict()

    resumed = stage_optimizers(1)
    resumed_sched = schedulers(resumed, True)
    resumed_sched.load_state_dict(state)  # stage 1 gets stage 0's scheduler state
    assert lrs(resumed) == pytest.approx(lrs(saved_stage1))
    advance(resumed_sched, 3)
    advance(sched1, 3)
    assert lrs(resumed) == pytest.approx(lrs(saved_stage1))
    assert len(set(lrs(resumed))) == 2  # AdamW and Muon groups differ


def test_stock_torchtitan_scheduler_state_breaks_differing_groups():
    """Why PerGroupLRSchedulersContainer exists (torchtitan 0.2.2 behaviour)."""
    stage0, stage1 = stage_optimizers(0), stage_optimizers(1)
    sched0, sched1 = schedulers(stage0, False), schedulers(stage1, False)
    assert type(sched0) is LRSchedulersContainer
    advance(sched0, 7)
    with pytest.raises(IndexError):  # stage 0's three lr lambdas into stage 1's two groups
        sched1.load_state_dict(sched0.state_dict())


# ----------------------------------------------------------------------------- shims and launch scripts


def test_cpu_shims_never_activate_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not cpu_shims.cpu_shims_needed()
    with pytest.raises(RuntimeError, match="CUDA"):
        cpu_shims.activate()


def test_every_shim_says_why():
    for shim in cpu_shims.SHIMS:
        assert shim.__doc__ and len(shim.__doc__.split()) > 15, shim.__name__


def test_integer_histc_matches_float(monkeypatch):
    monkeypatch.setattr(torch, "histc", torch.histc)
    reference = torch.histc(torch.tensor([0.0, 1, 1, 3, 7, 7, 7]), bins=8, min=0, max=8)
    cpu_shims.integer_histc()
    counts = torch.histc(torch.tensor([0, 1, 1, 3, 7, 7, 7]), bins=8, min=0, max=8)
    assert counts.dtype == torch.int64 and torch.equal(counts, reference.long())


def run_script(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=TEST_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_multinode_script_builds_the_torchrun_command():
    out = run_script(["bash", "launch/multinode.sh", "--job.config_file", "configs/llama3_8b.toml"],
                     dict(NNODES="4", NODE_RANK="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234",
                          GPUS_PER_NODE="8", PYTHON="echo"))
    assert out.split() == ["-m", "torch.distributed.run", "--nnodes", "4", "--node_rank", "2",
                           "--nproc_per_node", "8", "--master_addr", "10.0.0.1", "--master_port", "1234",
                           "--log-dir", "./outputs/torchrun_logs", "--redirects", "3",
                           "-m", "launch.train", "--job.config_file", "configs/llama3_8b.toml"]


def test_multinode_script_requires_node_rank():
    done = subprocess.run(["bash", "launch/multinode.sh"], cwd=REPO, capture_output=True, text=True, timeout=TEST_TIMEOUT,
                          env={**os.environ, "NNODES": "2", "MASTER_ADDR": "x", "PYTHON": "echo"})
    assert done.returncode != 0 and "NODE_RANK" in done.stderr


def test_slurm_script_starts_one_multinode_launch_per_node(tmp_path):
    """Fake ``srun``/``scontrol``: two nodes; check each runs multinode.sh with its NODE_RANK."""
    (tmp_path / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (tmp_path / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        "for n in 0 1; do SLURM_NODEID=$n \"$@\"; done\n")
    for stub in ("scontrol", "srun"):
        (tmp_path / stub).chmod(0o755)
    out = run_script(["bash", "launch/slurm.sbatch", "--training.steps", "5"],
                     dict(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="2",
                          SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_ID="77", SLURM_GPUS_ON_NODE="8",
                          PYTHON="echo"))
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for node_rank, line in enumerate(lines):
        assert f"--nnodes 2 --node_rank {node_rank} --nproc_per_node 8 --master_addr gpu-a --master_port 20077" in line
        assert line.endswith("-m launch.train --training.steps 5")


def test_autoregister_wraps_every_shipped_model():
    """``--experimental.custom_import dist_muon.integrations.torchtitan.autoregister`` (torchtitan's entry point)."""
    import importlib

    importlib.import_module("dist_muon.integrations.torchtitan.autoregister")
    for name in ("llama3", "llama4", "qwen3", "deepseek_v3", "gpt_oss"):
        spec = get_train_spec(name)
        assert getattr(spec.build_optimizers_fn, "dist_muon_wrapped", False), name
        assert getattr(spec.build_lr_schedulers_fn, "dist_muon_wrapped", False), name


@pytest.mark.parametrize("installed", ["0.1.0", "0.4.0", "1.0"])
def test_an_unsupported_torchtitan_names_the_supported_ones(monkeypatch, installed):
    import importlib.metadata

    from dist_muon.integrations.torchtitan import version

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    with pytest.raises(ImportError, match=rf"torchtitan {re.escape(installed)}.* not supported.*0\.2\.2 and 0\.3\.0"):
        version.require_supported()
