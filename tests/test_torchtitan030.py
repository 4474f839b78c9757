"""torchtitan 0.3.0 with DistMuon, from the main environment (torchtitan 0.2.2).

The two versions cannot share one interpreter, so everything here runs in the 0.3.0 environment
that ``launch.torchtitan030_env.ensure_env()`` builds once per machine (a ``pip --target`` directory
put first on PYTHONPATH):

* ``tests/torchtitan030/`` (config registry, CLI validation, container, fused-QKV routing,
  ``@override``, every backend × layout against the single-process step) as one pytest run;
* end to end on 2 CPU ranks through ``launch.train`` (0.3.0's Trainer with our CPU shims), sharing
  launches between checks: the llama3 and MoE debug configs train (the loss falls) and checkpoint;
  runs resumed from their step-2 checkpoints in another layout (FSDP 2 → 1 rank, FSDP 2 → TP 2,
  EP 2 → EP 1) restart at step 3 and end equal to the uninterrupted runs (parameters, optimizer state,
  every group's lr), read back with DCP in this process, as tests/test_torchtitan_resume.py does for
  0.2.2 (same repeated-document data, so every dp degree sees the same gradients).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from harness import TEST_TIMEOUT, ForkServer, Launcher
from test_torchtitan_e2e import REPO, assert_checkpoints, group_lrs, losses, resume_copy
from benchmarks.repeated_document import write_repeated_document
from test_torchtitan_resume import BATCH, K, LEARNS, RTOL, STEPS, differences

MODULE = "dist_muon.integrations.torchtitan"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo tests (the GPU path needs no shims)"),
]


@pytest.fixture(scope="module")
def env030(tmp_path_factory) -> dict[str, str]:
    """The environment of a process that runs torchtitan 0.3.0 (built on first use, then cached)."""
    from launch.torchtitan030_env import ensure_env

    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(ensure_env()), str(REPO)]), OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path_factory.mktemp("hf")), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def module_launcher(env030):
    """Runs the inner pytest, and the 2-rank jobs forked from a 0.3.0 rank fork server."""
    server = ForkServer(env030, str(REPO))
    launcher = Launcher(str(REPO), server)
    try:
        yield launcher
    finally:
        launcher.close()
        server.close()


# ----------------------------------------------------------------------------- the in-process tests


def test_the_030_test_folder_passes_in_the_030_environment(module_launcher, env030, tmp_path):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "tests/torchtitan030"]
    rc, out = module_launcher.start(cmd, tmp_path / "pytest030.log", env=env030, name="tests/torchtitan030").wait()
    tail = "\n".join(out.splitlines()[-60:])
    assert rc == 0, f"tests/torchtitan030 failed in the 0.3.0 environment (rc={rc}):\n{tail}"
    print("\n" + out.splitlines()[-1])


# ----------------------------------------------------------------------------- end to end, resume across layouts

# name -> (ranks, our config, parallelism flags, torchtitan's mesh log line for it)
LAYOUTS = {
    "fsdp2": (2, "llama3_debug_cpu", ["--parallelism.data_parallel_shard_degree", "2"], "dp_shard"),
    "one_rank": (1, "llama3_debug_cpu", ["--parallelism.data_parallel_shard_degree", "1"], None),
    "tp2": (2, "llama3_debug_cpu", ["--parallelism.data_parallel_shard_degree", "1",
                                    "--parallelism.tensor_parallel_degree", "2"], "tp"),
    "ep2": (2, "moe_debug_cpu", ["--parallelism.data_parallel_shard_degree", "2",
                                 "--parallelism.expert_parallel_degree", "2"], "ep"),
    "ep1": (2, "moe_debug_cpu", ["--parallelism.data_parallel_shard_degree", "2",
                                 "--parallelism.expert_parallel_degree", "1"], "dp_shard"),
}
DP = {"fsdp2": 2, "one_rank": 1, "tp2": 1, "ep2": 2, "ep1": 2}
TRANSITIONS = [("fsdp2", "one_rank"), ("fsdp2", "tp2"), ("ep2", "ep1")]
# torchtitan 0.3.0 computes a MoE's expert gradients in another float32 order with EP 2 than without
# EP (measured on one batch, same weights: 1.6e-5 relative on w2, 4.6e-6 on w3, everything else
# bitwise); Newton–Schulz maps an expert's nearly rank-deficient momentum (few tokens per expert) to
# an orthogonal factor, which amplifies such rounding in the small singular directions. The two runs'
# experts then differ by ~6e-4 after the resumed steps (router and norms, fed by the experts: ~2e-5).
# A resume that loses or misplaces state differs by O(1): see test_torchtitan_resume.py's wrong resume.
STATE_RTOL = {("ep2", "ep1"): 2e-3}
# A resume whose routing differs (attention.wo to AdamW): refused before anything is loaded.
REROUTED = "fsdp2_rerouted"
REROUTED_FLAGS = ["--optimizer.rules", '[{"pattern": "attention\\\\.wo", "algorithm": "adamw"}]']


class Runs:
    """The shared launches: each source trains steps 1..STEPS (checkpoints at K and STEPS); each
    target resumes a source's step-K checkpoint in its own layout. Launches of one phase run side by side."""

    def __init__(self, launcher, tmp_path: Path, data: tuple[Path, int]):
        self.launcher, self.tmp_path = launcher, tmp_path
        self.data, self.seq_len = data
        self.results: dict[str, tuple[int, str]] = {}

    def start(self, name: str, layout: str, resume_from: str | None = None, *more: str):
        ranks, config, flags, _ = LAYOUTS[layout]
        dump = self.tmp_path / name
        extra = []
        if resume_from is not None:
            resume_copy(self.tmp_path / resume_from, dump, K)
            if DP[resume_from] != DP[layout]:  # torchtitan refuses dataloader state of another dp degree
                extra = ["--checkpoint.exclude_from_loading", "dataloader"]
        t = str(int(TEST_TIMEOUT))
        args = ["--module", MODULE, "--config", config, "--dump_folder", str(dump),
                "--metrics.disable_color_printing", "--comm.init_timeout_seconds", t,
                "--comm.train_timeout_seconds", t, "--dataloader.dataset_path", str(self.data),
                "--training.seq_len", str(self.seq_len), "--training.local_batch_size", str(BATCH),
                "--training.steps", str(STEPS), "--checkpoint.interval", str(K),
                "--optimizer.ns_dtype", "float32", "--training.max_norm", "1000", *flags, *extra, *more]
        return self.launcher.start_ranks(ranks, args, self.tmp_path / f"{name}.log", name=name)

    def run(self, jobs: dict) -> None:
        for name, job in jobs.items():
            self.results[name] = job.wait()

    def log(self, name: str, start: int) -> str:
        rc, log = self.results[name]
        assert rc == 0, f"{name} failed (rc={rc}); log tail:\n{log[-6000:]}"
        assert f"Training starts at step {start}" in log, f"{name} did not start at step {start}"
        assert sorted(losses(log)) == list(range(start, STEPS + 1)), f"{name}: steps {sorted(losses(log))}"
        assert_checkpoints(self.tmp_path / name, [K, STEPS] if start == 1 else [STEPS])
        return log

    def final(self, name: str) -> Path:
        return self.tmp_path / name / "checkpoint" / f"step-{STEPS}"


@pytest.fixture(scope="module")
def repeated_document(tmp_path_factory) -> tuple[Path, int]:
    """As for 0.2.2, for 0.3.0's packing: a document of n tokens gives n - 1 inputs (inputs and labels
    are shifted within the document), cut into seq_len pieces."""
    folder = tmp_path_factory.mktemp("repeated_document")
    return folder, write_repeated_document(folder, lambda n: (n - 1) // BATCH if (n - 1) % BATCH == 0 else None, BATCH)


@pytest.fixture(scope="module")
def runs(module_launcher, tmp_path_factory, repeated_document) -> Runs:
    runs = Runs(module_launcher, tmp_path_factory.mktemp("tt030"), repeated_document)
    sources = dict.fromkeys(s for s, _ in TRANSITIONS)
    runs.run({s: runs.start(s, s) for s in sources})
    targets = {f"{s}_to_{t}": runs.start(f"{s}_to_{t}", t, resume_from=s) for s, t in TRANSITIONS
               if runs.results[s][0] == 0}
    if runs.results["fsdp2"][0] == 0:
        targets[REROUTED] = runs.start(REROUTED, "fsdp2", "fsdp2", *REROUTED_FLAGS)
    runs.run(targets)
    return runs


@pytest.mark.parametrize("source", ["fsdp2", "ep2"])
def test_debug_configs_train_and_checkpoint(runs, source):
    """llama3 (fused interleaved wqkv) and the MoE (deepseek_v3, EP 2) learn on 2 CPU ranks."""
    log = runs.log(source, 1)
    loss = logged_loss(log, source)
    assert min(loss[s] for s in (STEPS - 1, STEPS)) < loss[1] - LEARNS, f"{source}: loss did not decrease: {loss}"
    assert "DistMuon: matrices owned" in log and "group lrs: " in log


@pytest.mark.parametrize("source, target", TRANSITIONS)
def test_resume_in_another_layout_equals_the_uninterrupted_run(runs, source, target):
    name = f"{source}_to_{target}"
    full_log, resumed_log = runs.log(source, 1), runs.log(name, K + 1)
    rtol = STATE_RTOL.get((source, target), RTOL)
    problems, worst = differences(runs.final(source), runs.final(name), rtol, rtol)
    assert not problems, f"{name}: resumed run differs from the uninterrupted one:\n  " + "\n  ".join(problems[:30])
    loss, loss2 = logged_loss(full_log, source), logged_loss(resumed_log, target)
    for s in range(K + 1, STEPS + 1):
        assert loss2[s] == pytest.approx(loss[s], rel=1e-4), (name, s, loss[s], loss2[s])
    lrs, lrs2 = group_lrs(full_log), group_lrs(resumed_log)
    for s in range(K + 1, STEPS + 1):
        assert set(lrs2[s]) == set(lrs[s]), (name, s, lrs[s], lrs2[s])
    print(f"\n{source} -> {target}: max relative error " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
    assert max(worst.values()) <= rtol


def logged_loss(log: str, layout: str) -> dict[int, float]:
    """step -> loss; torchtitan 0.3.0's full_dtensor logs dp × the loss (its all-reduce SUM of an
    already reduced loss: a run on 1 rank logs 8.3 at step 1, the same on 2 FSDP ranks 16.3)."""
    return {s: v / DP[layout] for s, v in losses(log).items()}


def test_a_resume_with_other_routing_stops_before_loading(runs):
    """0.3.0's CheckpointManager would let dcp.load write the live state in place first; DistMuonTrainer
    checks the checkpoint's metadata before, naming the parameter and both algorithms."""
    rc, out = runs.results[REROUTED]
    assert rc != 0
    assert "CheckpointError" in out and "nothing was loaded" in out, out[-4000:]
    assert "layers.0.attention.wo.weight: routed to 'muon' in the checkpoint" in out, out[-4000:]
    assert "Training starts" not in out
