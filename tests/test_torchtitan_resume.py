"""Resume across parallelism changes through torchtitan 0.2.2's real Trainer (``launch.train`` on 1, 2 or 4 ranks).

Each transition: layout A trains steps 1..4 and checkpoints at 2 and 4 (one launch); layout B resumes
from A's step-2 checkpoint and trains steps 3..4 (one launch). B's final checkpoint must equal A's:
every parameter and every optimizer-state tensor (Muon momentum, AdamW moments and step counters),
<= 1e-5 relative with float32 Newton-Schulz, and every param group's lr. The final checkpoints are
read in this process with DCP (keys are FQNs, DTensors come back whole), so layouts compare directly.
Sources shared by several transitions run once; docs/resume_across_layouts.md has the table.

Why the runs can be equal at all when the data-parallel degree changes:

* torchtitan shards the data by dp rank (``split_dataset_by_node``), so dp 2 and dp 1 read different
  token streams, and its dataloader refuses a checkpoint from another dp degree
  (``dp_degree is inconsistent before and after checkpoint, dataloader resharding is not supported
  yet``). The runs here read a dataset of one repeated document of exactly 2 sequences: every rank
  of every layout sees the same two sequences at every step (batch 2 per dp rank), so the gradient
  is the same for any dp degree, and B may skip the dataloader state when dp changes
  (``--checkpoint.exclude_from_loading dataloader``) without reading other data than A.
* Gradient clipping is off, or on in both runs where torchtitan's gradient scale differs between the
  layouts (see NO_CLIPPING and CLIPPED).
* torchtitan's flavors cannot be resized from the command line; ``register_tiny_flavors`` adds
  2-layer flavors of the debug models (small MLA dims for deepseek_v3, whose stock Newton-Schulz work
  takes seconds per CPU step), imported into each trainer with ``--experimental.custom_import``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks.repeated_document import packing_022, write_repeated_document
from harness import Launcher
from test_torchtitan_e2e import (
    DEBUG, DEBUG_MOE, LEARNS, REPO, assert_checkpoints, assert_muon_adamw_ratio, checkpoint_lrs, group_lrs,
    losses, lr_pairs, resume_copy, train_args,
)

TINY = "debugmodel_2layers"
K, STEPS = 2, 4  # checkpoint at K: A runs steps 1..STEPS, B resumes at K + 1
RTOL = 1e-5
BATCH = 2  # sequences per dp rank and step: the repeated document is exactly BATCH sequences long
# Gradient clipping scales every gradient by max_norm / |g|, and torch's float32 CPU norm of the 2048 x 256
# output-head gradient is off by ~1.5e-4 relative on the whole tensor (one rank, pipeline stages) but
# not on FSDP's halves: every momentum buffer then differs by ~5e-5 for reasons that have nothing to do
# with resuming. The gradient norms here are ~2, far below this max_norm: nothing is clipped.
NO_CLIPPING = ["--training.max_norm", "1000"]
# ...except where torchtitan 0.2.2's gradients differ by a constant factor between the layouts: its
# pipeline schedule back-propagates the summed loss (scale_grads=False), so a PP gradient is (tokens
# per step) times the others'; its DDP averages over dp a loss already divided by the global token
# count, so a DDP gradient is 1/dp of FSDP's. Clipping every step (all gradient norms here are >= 1.1)
# gives both the same norm, up to the norm's float32 error above: the optimizer state then agrees to
# that error, the parameters still to RTOL (Muon's and AdamW's updates ignore the gradient's scale).
CLIPPED = ["--training.max_norm", "0.5"]
CLIPPED_STATE_RTOL = 3e-4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo end-to-end tests (the GPU path needs no shims)"),
]


def register_tiny_flavors() -> None:
    """2-layer flavors of the llama3 and deepseek_v3 debug models, for ``--experimental.custom_import``."""
    from torchtitan.models.deepseek_v3 import deepseekv3_args
    from torchtitan.models.llama3 import llama3_args

    llama3_args[TINY] = dataclasses.replace(llama3_args["debugmodel"], n_layers=2)
    ds = deepseekv3_args["debugmodel"]
    # layer 0 dense, layer 1 MoE (8 routed experts, EP-shardable); MLA dims cut 4x
    deepseekv3_args[TINY] = dataclasses.replace(
        ds, n_layers=2, moe_args=copy.deepcopy(ds.moe_args), kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32)


# The launched trainers import this module (custom_import) and set TINY_FLAVORS; pytest's own import
# leaves torchtitan's model registry alone (other test modules share the process).
TINY_FLAVORS = "DIST_MUON_TEST_TINY_FLAVORS"
if os.environ.get(TINY_FLAVORS) == "1":
    register_tiny_flavors()


# ----------------------------------------------------------------------------- layouts and launches

# name -> (ranks, [parallelism] flags, torchtitan's mesh line for it: proof the run used that layout)
LAYOUTS = {
    "fsdp2": (2, ["--parallelism.data_parallel_shard_degree", "2"], "pp=1, dp_replicate=1, dp_shard=2, cp=1, tp=1"),
    "one_rank": (1, ["--parallelism.data_parallel_shard_degree", "1"], "pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=1"),
    "tp2": (2, ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "2"],
            "pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=2"),
    "pp2": (2, ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.pipeline_parallel_degree", "2",
                "--parallelism.pipeline_parallel_microbatch_size", "1"],
            "pp=2, dp_replicate=1, dp_shard=1, cp=1, tp=1"),
    # replicate 2 x shard 1: torchtitan applies DDP (torch's composable replicate), not HSDP: plain tensors
    "ddp2": (2, ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree",
                 "1"], "pp=1, dp_replicate=2, dp_shard=1, cp=1, tp=1"),
    "hsdp_2x2": (4, ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree",
                     "2"], "pp=1, dp_replicate=2, dp_shard=2, cp=1, tp=1"),
    "ep2": (2, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2"],
            "dp_shard=2, cp=1, tp=1, ep=2"),
    "ep1": (2, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "1"],
            "dp_shard=2, cp=1, tp=1, ep=1"),
}
DP_DEGREE = {"fsdp2": 2, "one_rank": 1, "tp2": 1, "pp2": 1, "ddp2": 2, "hsdp_2x2": 4, "ep2": 2, "ep1": 2}


@pytest.fixture(scope="module")
def repeated_document(tmp_path_factory) -> tuple[Path, int]:
    """(c4-style dataset folder, seq_len): one document of exactly BATCH sequences, repeated.

    torchtitan 0.2.2 appends each document's tokens (with BOS and EOS) to a buffer and cuts it into
    seq_len + 1 token pieces, so every rank's stream is the same BATCH sequences over and over,
    whatever the dp degree and wherever the dataloader starts.
    """
    folder = tmp_path_factory.mktemp("repeated_document")
    return folder, write_repeated_document(folder, packing_022(BATCH), BATCH)


@pytest.fixture(scope="module")
def module_launcher(forkserver):
    """The runs are shared by the transitions' tests; whatever is left of a launch is killed with the module.

    (Each launch is waited for, and whatever it left behind killed, before any test looks at it.)"""
    launcher = Launcher(str(REPO), forkserver)
    try:
        yield launcher
    finally:
        launcher.close()


class Runs:
    """The launches of one model: tiny flavor, the repeated document, fp32 NS, checkpoints at K and STEPS.

    ``start`` returns at once and ``wait`` collects every started launch: launches that do not
    depend on each other run side by side (much of a launch is start-up and waiting on peers).
    Results are kept, not asserted, so each transition's test reports its own.
    """

    def __init__(self, launcher, tmp_path: Path, data: tuple[Path, int], config: Path):
        self.launcher, self.tmp_path, self.config = launcher, tmp_path, config
        self.data, self.seq_len = data
        self.jobs: dict[str, object] = {}
        self.layout_of: dict[str, str] = {}
        self.source_of: dict[str, str | None] = {}
        self.results: dict[str, tuple[int, str]] = {}

    def start(self, name: str, layout: str, *extra: str, resume_from: str | None = None) -> None:
        """Train ``layout`` to STEPS; ``resume_from``: a finished run, resumed from its step K."""
        ranks, flags, _ = LAYOUTS[layout]
        dump = self.tmp_path / name
        if resume_from is not None:
            resume_copy(self.tmp_path / resume_from, dump, K)
            if DP_DEGREE[self.layout_of[resume_from]] != DP_DEGREE[layout]:
                extra = ("--checkpoint.exclude_from_loading", "dataloader", *extra)
        args = train_args(
            self.config, dump, "--model.flavor", TINY, "--experimental.custom_import", "test_torchtitan_resume",
            "--training.dataset_path", str(self.data), "--training.seq_len", str(self.seq_len),
            "--training.local_batch_size", str(BATCH), "--training.steps", str(STEPS),
            "--checkpoint.interval", str(K), "--checkpoint.no_last_save_model_only",
            "--optimizer.ns_dtype", "float32", *NO_CLIPPING, *flags, *extra)
        # the fork server has tests/ on sys.path (custom_import finds this module)
        self.jobs[name] = self.launcher.start_ranks(ranks, args[2:], self.tmp_path / f"{name}.log",
                                                    env={TINY_FLAVORS: "1"}, name=name)
        self.layout_of[name], self.source_of[name] = layout, resume_from

    def wait(self) -> None:
        for name, job in list(self.jobs.items()):
            self.results[name] = job.wait()
            del self.jobs[name]

    def log(self, name: str) -> str:
        """The run's log, once it trained the steps it should, in its layout, and saved its checkpoints."""
        rc, log = self.results[name]
        errors = sorted({line.split(": ", 1)[-1] for line in log.splitlines() if "Error: " in line})
        assert rc == 0, f"{name} failed (rc={rc}): {errors[:3]}; log tail:\n{log[-6000:]}"
        start = 1 if self.source_of[name] is None else K + 1
        assert f"Training starts at step {start}" in log, f"{name} did not start at step {start}"
        assert sorted(losses(log)) == list(range(start, STEPS + 1)), f"{name}: steps {sorted(losses(log))}"
        assert LAYOUTS[self.layout_of[name]][2] in log, f"{name} did not run as {self.layout_of[name]}"
        assert_checkpoints(self.tmp_path / name, [K, STEPS] if start == 1 else [STEPS])
        return log

    def final(self, name: str) -> Path:
        return self.tmp_path / name / "checkpoint" / f"step-{STEPS}"


# ----------------------------------------------------------------------------- comparing checkpoints


def load_checkpoint(step_dir: Path) -> dict:
    """A DCP checkpoint as one flat dict, dotted FQN keys; DTensors and sharded state come back whole."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        nested = _load_state_dict_from_keys(checkpoint_id=str(step_dir))

    def flat(d: dict, prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    return dict(flat(nested))


def differences(expected_dir: Path, actual_dir: Path, state_rtol: float = RTOL,
                param_rtol: float = RTOL) -> tuple[list[str], dict[str, float]]:
    """(problems, largest relative error of parameters and of optimizer state) between two final checkpoints.

    Compared: every model tensor, every optimizer-state tensor and every param group's lr and other
    hyperparameters (per parameter FQN), the step and the schedule position. Not compared: the
    dataloader (per dp rank by construction), the token count (the global batch repeats the same
    sequences dp times) and each group's member list (per pipeline stage).
    """
    a, b = load_checkpoint(expected_dir), load_checkpoint(actual_dir)
    skip = ("dataloader.", "train_state.ntokens_seen")
    keys_a = {k for k in a if not k.startswith(skip) and not k.endswith(".param_names")}
    keys_b = {k for k in b if not k.startswith(skip) and not k.endswith(".param_names")}
    problems = [f"only in {expected_dir.parent.parent.name}: {k}" for k in sorted(keys_a - keys_b)]
    problems += [f"only in {actual_dir.parent.parent.name}: {k}" for k in sorted(keys_b - keys_a)]
    worst = {"parameters": 0.0, "optimizer state": 0.0}
    for key in sorted(keys_a & keys_b):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            x, y = x.double(), y.double()
            if x.shape != y.shape:
                problems.append(f"{key}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
                continue
            err = (x - y).norm().item() / max(x.norm().item(), 1e-30)
            kind = "optimizer state" if key.startswith("optimizer.") else "parameters"
            worst[kind] = max(worst[kind], err)
            rtol = state_rtol if kind == "optimizer state" else param_rtol
            if not err <= rtol:
                problems.append(f"{key}: relative error {err:.3g} > {rtol:g}")
        elif isinstance(x, float):
            if not y == pytest.approx(x, rel=1e-9):
                problems.append(f"{key}: {x!r} vs {y!r}")
        elif x != y:
            problems.append(f"{key}: {x!r} vs {y!r}")
    return problems, worst


def lr_sets(log: str) -> dict[int, set[tuple[str, float]]]:
    """step -> every (algorithm, lr) any rank logged; pipeline stages prefix theirs with the stage index."""
    return {step: {(name.split(".")[-1], lr) for line in lines for name, lr in lr_pairs(line)}
            for step, lines in group_lrs(log).items()}


def check_resumed(runs: Runs, full: str, resumed: str) -> dict[str, float]:
    """The resumed run equals the uninterrupted one; returns the largest relative errors."""
    full_log, resumed_log = runs.log(full), runs.log(resumed)
    state_rtol = CLIPPED_STATE_RTOL if SOURCES[full][1] == CLIPPED else RTOL  # see CLIPPED
    problems, worst = differences(runs.final(full), runs.final(resumed), state_rtol)
    assert not problems, f"{full} -> {resumed}: resumed run differs from the uninterrupted one:\n  " + "\n  ".join(
        problems[:30])
    loss, loss2 = losses(full_log), losses(resumed_log)
    for s in range(K + 1, STEPS + 1):
        assert loss2[s] == pytest.approx(loss[s], rel=1e-4), (resumed, s, loss[s], loss2[s])
    # each group's lr at every resumed step, as logged by the trainer (the checkpoints agree at STEPS)
    lrs, lrs2 = lr_sets(full_log), lr_sets(resumed_log)
    for s in range(K + 1, STEPS + 1):
        assert lrs2[s] == lrs[s], (resumed, s, lrs[s], lrs2[s])
    print(f"\n{full} -> {runs.layout_of[resumed]}: max relative error "
          + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
    return worst


# ----------------------------------------------------------------------------- tests

# source run -> (its layout, its flags, which its resumed runs keep)
SOURCES = {
    "fsdp2": ("fsdp2", []),
    "fsdp2_clipped": ("fsdp2", CLIPPED),
    "hsdp_2x2": ("hsdp_2x2", []),
    "ddp2_clipped": ("ddp2", CLIPPED),
    "ep2": ("ep2", []),
    "ep1": ("ep1", []),
}
LLAMA3 = [
    ("fsdp2", "one_rank"),
    ("fsdp2", "tp2"),  # TP leaves some gradients in other placements than their weights
    ("fsdp2_clipped", "pp2"),  # each stage's param groups are parts of the checkpoint's
    ("hsdp_2x2", "fsdp2"),
    ("ddp2_clipped", "fsdp2"),
]
MOE = [("ep2", "ep1"), ("ep1", "ep2")]
# The deliberately wrong resume: another lr schedule (warmup 4 instead of 2: step K + 2 runs at the full
# lr instead of the decayed one) and clipped gradients (from step K + 1 on: other momentum). Another
# --optimizer.lr would not do: the checkpoint's param-group lrs win over the command line. Nor would a
# schedule alone change step K + 1, which runs with the lr stored in the checkpoint.
WRONG_FLAGS = ["--lr_scheduler.warmup_steps", "4", *CLIPPED]
WRONG = "fsdp2_to_one_rank_wrong"
# A resume with other param groups (the output head in a group of its own): must stop before loading.
REGROUPED = "fsdp2_regrouped"
REGROUPED_FLAGS = ["--optimizer.rules", '[{"pattern": "^output", "algorithm": "adamw", "lr": 0.01}]']


def launch_transitions(plans) -> None:
    """Every source run from step 0, then every resumed run; each phase's launches side by side, for
    both models at once (much of a launch is start-up and waiting on peers).

    ``plans``: ``(runs, transitions, also)``; ``also``: more resumed runs, ``(name, layout, flags, source)``.
    """
    plans = [(runs, [t.values if hasattr(t, "values") else t for t in transitions], also)
             for runs, transitions, also in plans]
    for runs, pairs, _ in plans:
        for source in dict.fromkeys(s for s, _ in pairs):
            layout, flags = SOURCES[source]
            runs.start(source, layout, *flags)
    for runs, _, _ in plans:
        runs.wait()
    for runs, pairs, also in plans:
        for name, layout, flags, source in [(f"{s}_to_{t}", t, SOURCES[s][1], s) for s, t in pairs] + list(also):
            if runs.results[source][0] == 0:  # else the source's own test reports why
                runs.start(name, layout, *flags, resume_from=source)
    for runs, _, _ in plans:
        runs.wait()


@pytest.fixture(scope="module")
def all_runs(module_launcher, tmp_path_factory, repeated_document) -> dict[str, Runs]:
    runs = {"llama3": Runs(module_launcher, tmp_path_factory.mktemp("llama3"), repeated_document, DEBUG),
            "moe": Runs(module_launcher, tmp_path_factory.mktemp("moe"), repeated_document, DEBUG_MOE)}
    launch_transitions([(runs["llama3"], LLAMA3, [(WRONG, "one_rank", WRONG_FLAGS, "fsdp2"),
                                                  (REGROUPED, "fsdp2", REGROUPED_FLAGS, "fsdp2")]),
                        (runs["moe"], MOE, [])])
    return runs


@pytest.fixture(scope="module")
def llama3_runs(all_runs) -> Runs:
    return all_runs["llama3"]


@pytest.fixture(scope="module")
def moe_runs(all_runs) -> Runs:
    return all_runs["moe"]


@pytest.mark.parametrize("source, target", LLAMA3)
def test_llama3_resumes_in_another_layout(llama3_runs, source, target):
    """llama3 debug model: a checkpoint of ``source`` at step K, resumed in ``target``, ends as ``source`` does."""
    check_resumed(llama3_runs, source, f"{source}_to_{target}")


def test_a_wrong_resume_is_caught(llama3_runs):
    """The comparison fails a resumed run with another lr and other gradients: parameters, state and lrs."""
    with pytest.raises(AssertionError, match="relative error"):
        check_resumed(llama3_runs, "fsdp2", WRONG)
    problems, _ = differences(llama3_runs.final("fsdp2"), llama3_runs.final(WRONG))
    assert any(p.startswith("optimizer.param_groups.") and ".lr:" in p for p in problems), problems
    assert any(p.startswith("layers.") and "relative error" in p for p in problems), problems
    assert any("momentum_buffer: relative error" in p for p in problems), problems
    assert lr_sets(llama3_runs.log(WRONG))[STEPS] != lr_sets(llama3_runs.log("fsdp2"))[STEPS]


@pytest.mark.parametrize("source, target", MOE)
def test_moe_resumes_in_another_layout(moe_runs, source, target):
    """deepseek_v3 MoE debug model: experts on EP 2 <-> FSDP 2 without EP (ep1)."""
    check_resumed(moe_runs, source, f"{source}_to_{target}")


# ----------------------------------------------------------------------------- the debug configs end to end
# (these share the launches above: each torchrun job checks several things)


def assert_trains_and_resumes(runs: Runs, source: str, resumed: str) -> None:
    """The source run learns; the resumed run restarts at step K + 1 and every group keeps its own lr
    (Muon ≠ AdamW) in the log and in the final checkpoint."""
    loss = losses(runs.log(source))
    assert min(loss[s] for s in (STEPS - 1, STEPS)) < loss[1] - LEARNS, f"{source}: loss did not decrease: {loss}"
    assert_muon_adamw_ratio(group_lrs(runs.log(resumed)), 0.02 / 0.004)
    final = checkpoint_lrs(runs.final(resumed))
    assert final == pytest.approx(checkpoint_lrs(runs.final(source)), rel=1e-9)
    assert len(set(final.values())) > 1, final


def test_llama3_debug_config_trains_checkpoints_and_resumes(llama3_runs):
    assert_trains_and_resumes(llama3_runs, "fsdp2", "fsdp2_to_one_rank")


def test_moe_debug_config_trains_checkpoints_and_resumes(moe_runs):
    """deepseek_v3 (MoE, EP 2): the same."""
    assert_trains_and_resumes(moe_runs, "ep2", "ep2_to_ep1")


def test_resume_with_other_param_groups_stops_before_loading(llama3_runs):
    """torchtitan's dcp.load would write the tensors before DistMuon.load_state_dict objects; the
    check in launch.train stops the job first, naming the parameter."""
    rc, out = llama3_runs.results[REGROUPED]
    assert rc != 0
    assert "CheckpointError" in out and "nothing was loaded" in out, out[-4000:]
    assert "output.weight: its param group holds" in out, out[-4000:]
    assert "Training starts" not in out
