"""End to end: torchtitan 0.2.2's real Trainer with DistMuon, on 2 CPU/gloo ranks.

Each test launches ``launch.train`` through the ``launcher`` fixture: with torchrun where the
command is the point (two nodes, a bad setting at start-up; the README's launch script), else on
ranks forked from the session's rank fork server (tests/rank_forkserver.py). Every launch
has torchtitan's collective timeouts (a hang fails the job instead of blocking CI), and whatever
is still running when the test ends is killed. Runs are as short as what they prove allows
(a few steps, checkpoints every step or two). Everything is written under pytest's tmp_path; the
configs and assets are the repo's own (configs/debug_*.toml, assets/): nothing downloads.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

import harness
from harness import collective_timeout_args, free_port

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "configs" / "debug_cpu.toml"
DEBUG_MOE = REPO / "configs" / "debug_moe_cpu.toml"
LEARNS = 0.3  # loss drop over the first 4-6 steps of the debug models (0.4-0.6 here), far above noise

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo end-to-end tests (the GPU path needs no shims)"),
]


# ----------------------------------------------------------------------------- helpers


def launch_env(tmp_path: Path) -> dict[str, str]:
    return harness.launch_env(tmp_path / "hf")  # datasets' cache of the local JSON, per test


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def train_args(config: Path, dump: Path, *overrides: str) -> list[str]:
    return ["-m", "launch.train", "--job.config_file", str(config), "--job.dump_folder", str(dump),
            "--metrics.disable_color_printing", *collective_timeout_args(), *overrides]


def run(launcher, cmd: list[str], tmp_path: Path, name: str) -> tuple[int, str]:
    return launcher.start(cmd, tmp_path / f"{name}.log", env=launch_env(tmp_path), name=name).wait()


def losses(log: str) -> dict[int, float]:
    """step -> loss; torchtitan logs -1 on pipeline stages that do not compute the loss."""
    found = re.findall(r"step:\s*(\d+)\s+loss:\s*([-\d.eE+na]+)", log)
    return {int(s): float(v) for s, v in found if float(v) != -1.0}


def group_lrs(log: str) -> dict[int, list[str]]:
    """step -> every rank's lr line from DistMuonTrainer ('adamw=0.0024 muon=0.012'), sorted."""
    out: dict[int, list[str]] = {}
    for step, line in re.findall(r"step\s+(\d+)\s+group lrs: (.*)", log):
        out.setdefault(int(step), []).append(line.strip())
    return {step: sorted(lines) for step, lines in out.items()}


def lr_pairs(line: str) -> list[tuple[str, float]]:
    return [(k, float(v)) for k, v in (kv.split("=") for kv in line.split())]


def checkpoint_lrs(step_dir: Path) -> dict[str, float]:
    """param FQN -> the lr of its param group, read from a DCP checkpoint (only those entries)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    prefix = "optimizer.param_groups."
    keys = {k for k in FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
            if k.startswith(prefix) and k.endswith(".lr")}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(keys, checkpoint_id=str(step_dir))["optimizer"]
    return {k[len("param_groups."):-len(".lr")]: v for k, v in loaded.items()}


def assert_checkpoints(dump: Path, steps: list[int]) -> None:
    for step in steps:
        step_dir = dump / "checkpoint" / f"step-{step}"
        assert (step_dir / ".metadata").is_file(), f"no checkpoint at {step_dir}"
        assert list(step_dir.glob("*.distcp")), f"no shards in {step_dir}"


def resume_copy(dump: Path, into: Path, step: int) -> Path:
    """A fresh dump folder holding only checkpoint ``step``: the next run resumes from it."""
    shutil.copytree(dump / "checkpoint" / f"step-{step}", into / "checkpoint" / f"step-{step}")
    return into


def check_train_and_resume(launcher, tmp_path: Path, config: Path, steps: int, resume_from: int,
                           *overrides: str) -> tuple[dict, dict]:
    """Train ``steps`` steps, resume a second run from checkpoint ``resume_from``, compare them.

    Returns both runs' per-step group lr lines for test-specific checks.
    """
    def launch(dump: Path, name: str) -> str:
        args = train_args(config, dump, "--training.steps", str(steps), "--checkpoint.interval", str(resume_from),
                          *overrides)
        rc, out = launcher.start_ranks(2, args[2:], tmp_path / f"{name}.log", name=name).wait()
        assert rc == 0, f"{name} failed (rc={rc}); log tail:\n{out[-8000:]}"
        return out

    full = tmp_path / "full"
    log = launch(full, "full")
    loss = losses(log)
    assert sorted(loss) == list(range(1, steps + 1)), f"missing steps in the log: {sorted(loss)}"
    assert min(loss[s] for s in range(steps - 1, steps + 1)) < loss[1] - LEARNS, f"loss did not decrease: {loss}"
    assert_checkpoints(full, [resume_from, steps])

    resumed = resume_copy(full, tmp_path / "resumed", resume_from)
    log2 = launch(resumed, "resumed")
    assert f"Training starts at step {resume_from + 1}" in log2, "the second run did not resume"
    loss2, lrs, lrs2 = losses(log2), group_lrs(log), group_lrs(log2)
    assert sorted(loss2) == list(range(resume_from + 1, steps + 1))
    # Same data position, weights and optimizer state: the resumed run retraces the first one.
    for s in loss2:
        assert loss2[s] == pytest.approx(loss[s], rel=1e-3, abs=1e-3), (s, loss[s], loss2[s])
    # Every param group resumes with its own lr, exactly as in the unbroken run.
    for s in range(resume_from + 1, steps + 1):
        assert lrs2[s] == lrs[s], (s, lrs[s], lrs2[s])
    final, final2 = (checkpoint_lrs(d / "checkpoint" / f"step-{steps}") for d in (full, resumed))
    assert final2 == pytest.approx(final, rel=1e-9)
    assert final2["output.weight"] != pytest.approx(final2["layers.0.attention.wq.weight"])
    return lrs, lrs2


def assert_muon_adamw_ratio(lrs: dict[int, list[str]], ratio: float) -> None:
    for step, lines in lrs.items():
        for line in lines:
            values = dict(lr_pairs(line))
            assert values["muon"] == pytest.approx(ratio * values["adamw"], rel=1e-4), (step, line)


# ----------------------------------------------------------------------------- tests


# The debug configs' train -> checkpoint -> resume checks share the launches of
# tests/test_torchtitan_resume.py (test_*_debug_config_trains_checkpoints_and_resumes there).


def test_pipeline_stages_resume_with_their_own_lrs(launcher, tmp_path):
    """PP 2: one DistMuon per stage, and the stages' param groups differ (a rule gives the
    embedding, on stage 0 only, its own lr). torchtitan 0.2.2 restores one stage's scheduler
    state on every stage (here: a crash at the first step after resume); each stage must
    resume with its own groups' lrs."""
    rules = '[{"pattern": "tok_embeddings", "algorithm": "adamw", "lr": 0.01}]'
    _, resumed = check_train_and_resume(
        launcher, tmp_path, DEBUG, 4, 2,
        "--parallelism.data_parallel_shard_degree", "1", "--parallelism.pipeline_parallel_degree", "2",
        "--parallelism.pipeline_parallel_microbatch_size", "2", "--optimizer.rules", rules,
    )
    # warmup 2 of 4 steps, linear decay to 0.1: the factor at step 3 is 1.0
    assert resumed[3] == sorted(["adamw=0.01 muon=0.02 adamw=0.004", "muon=0.02 adamw=0.004"])


def test_two_node_launch_on_one_machine(launcher, tmp_path):
    """launch/multinode.sh twice (NODE_RANK 0 and 1, one process each) rendezvousing on 127.0.0.1."""
    port, dump = free_port(), tmp_path / "two_node"
    jobs = []
    for node_rank in (0, 1):
        env = launch_env(tmp_path)
        env.update(NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   GPUS_PER_NODE="1", PYTHON=sys.executable, LOG_DIR=str(tmp_path / "torchrun_logs"))
        cmd = ["bash", str(REPO / "launch" / "multinode.sh"), *train_args(DEBUG, dump)[2:],
               "--training.steps", "2", "--checkpoint.interval", "1"]
        jobs.append(launcher.start(cmd, tmp_path / f"node{node_rank}.log", env=env, name=f"node {node_rank}"))
    results = [job.wait() for job in jobs]
    for node_rank, (rc, out) in enumerate(results):
        assert rc == 0, f"node {node_rank} failed (rc={rc}); log tail:\n{out[-8000:]}"
    node0, node1 = results[0][1], results[1][1]
    assert sorted(losses(node0)) == [1, 2], node0[-3000:]
    assert "dp_shard=2" in node0, "the two nodes did not form one 2-rank job"
    assert_checkpoints(dump, [1, 2])
    # one log stream: rank 0 on the console, the other rank only in its torchrun log file
    assert "step:" not in node1, node1[-3000:]
    logged = [p for p in (tmp_path / "torchrun_logs").rglob("*.log") if losses(p.read_text())]
    assert len(logged) == 2, f"expected one log file per rank, got {logged}"
    assert len(re.findall(r"step:\s*1\s+loss", node0)) == 1, "a line appears more than once"


def test_bad_optimizer_setting_fails_at_startup(launcher, tmp_path):
    """An invalid [optimizer] value stops a torchrun launch before any training, naming the field.

    (Unknown fields and the other invalid values go through the same parse_config; they are
    covered in-process by test_torchtitan_config.py.)
    """
    args = train_args(DEBUG, tmp_path / "out", "--optimizer.momentum", "1.5")
    rc, out = run(launcher, torchrun("--standalone", "--nproc_per_node=2", *args), tmp_path, "bad")
    assert rc != 0
    assert "[optimizer] momentum: must be >= 0 and < 1, got 1.5" in out, out[-4000:]
    assert "Training starts" not in out


def test_main_job_shows_one_log_stream(launcher, tmp_path):
    """launch/debug_cpu.sh (the README's main job) asks torchrun for rank 0 on the console and every
    rank's output as files in <dump folder>/logs (torchrun stubbed: the flags are the point here; the
    two-node test above runs them for real)."""
    bin_dir, dump = tmp_path / "bin", tmp_path / "dump"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/bin/bash\necho "torchrun $*"\nmkdir -p "$DUMP_FOLDER/checkpoint"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DUMP_FOLDER": str(dump)}
    rc, out = launcher.start(["bash", str(REPO / "launch" / "debug_cpu.sh")], tmp_path / "main.log", env=env).wait()
    assert rc == 0, out
    runs = [line.split() for line in out.splitlines() if line.startswith("torchrun ")]
    assert len(runs) == 2, out
    for args in runs:
        flags = " ".join(args)
        assert "--tee 3 --local-ranks-filter 0" in flags and f"--log-dir {dump}/logs" in flags, flags
