"""End to end: torchtitan 0.2.2's real Trainer with DistMuon, launched with torchrun on CPU/gloo.

Each test launches ``launch.train`` in subprocesses (own session, killed on timeout, so a hang
fails the test instead of blocking CI) and writes everything under pytest's tmp_path. The
configs and assets are the repo's own (configs/debug_*.toml, assets/): nothing downloads.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "configs" / "debug_cpu.toml"
DEBUG_MOE = REPO / "configs" / "debug_moe_cpu.toml"
LAUNCH_TIMEOUT = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo end-to-end tests (the GPU path needs no shims)"),
]


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        HF_HOME=str(tmp_path / "hf"),  # datasets' cache of the local JSON, per test
        HF_HUB_OFFLINE="1",  # prove nothing downloads
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return env


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def train_args(config: Path, dump: Path, *overrides: str) -> list[str]:
    return ["-m", "launch.train", "--job.config_file", str(config), "--job.dump_folder", str(dump),
            "--metrics.disable_color_printing", *overrides]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT) -> tuple[int, str]:
    """Wait for a launch; on timeout kill its whole session (torchrun and its workers)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"launch timed out after {timeout}s; log tail:\n{log.read_text()[-5000:]}")
    return rc, log.read_text()


def run(cmd: list[str], tmp_path: Path, name: str) -> tuple[int, str]:
    log = tmp_path / f"{name}.log"
    return finish(start(cmd, launch_env(tmp_path), log), log)


def run_ok(cmd: list[str], tmp_path: Path, name: str) -> str:
    rc, out = run(cmd, tmp_path, name)
    assert rc == 0, f"{name} failed (rc={rc}); log tail:\n{out[-8000:]}"
    return out


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


def check_train_and_resume(tmp_path: Path, config: Path, steps: int, resume_from: int,
                           *overrides: str) -> tuple[dict, dict]:
    """Train ``steps`` steps, resume a second run from checkpoint ``resume_from``, compare them.

    Returns both runs' per-step group lr lines for test-specific checks.
    """
    def launch(dump: Path, name: str) -> str:
        args = train_args(config, dump, *overrides)
        return run_ok(torchrun("--standalone", "--nproc_per_node=2", *args), tmp_path, name)

    full = tmp_path / "full"
    log = launch(full, "full")
    loss = losses(log)
    assert sorted(loss) == list(range(1, steps + 1)), f"missing steps in the log: {sorted(loss)}"
    assert min(loss[s] for s in range(steps - 2, steps + 1)) < loss[1] - 0.5, f"loss did not decrease: {loss}"
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


def test_debug_cpu_trains_checkpoints_and_resumes(tmp_path):
    """llama3 debugmodel, FSDP over 2 CPU ranks: 20 steps, checkpoints at 10 and 20, resume from 10."""
    _, resumed = check_train_and_resume(tmp_path, DEBUG, 20, 10)
    assert_muon_adamw_ratio(resumed, 0.02 / 0.004)


def test_debug_moe_cpu_trains_checkpoints_and_resumes(tmp_path):
    """deepseek_v3 debugmodel (MoE) with expert parallel 2 on 2 CPU ranks: 10 steps, resume from 5."""
    _, resumed = check_train_and_resume(tmp_path, DEBUG_MOE, 10, 5)
    assert_muon_adamw_ratio(resumed, 0.02 / 0.004)


def test_pipeline_stages_resume_with_their_own_lrs(tmp_path):
    """PP 2: one DistMuon per stage, and the stages' param groups differ (a rule gives the
    embedding, on stage 0 only, its own lr). torchtitan 0.2.2 restores one stage's scheduler
    state on every stage (here: a crash at the first step after resume); each stage must
    resume with its own groups' lrs."""
    rules = '[{"pattern": "tok_embeddings", "algorithm": "adamw", "lr": 0.01}]'
    _, resumed = check_train_and_resume(
        tmp_path, DEBUG, 4, 2,
        "--parallelism.data_parallel_shard_degree", "1", "--parallelism.pipeline_parallel_degree", "2",
        "--parallelism.pipeline_parallel_microbatch_size", "2", "--training.steps", "4",
        "--checkpoint.interval", "2", "--optimizer.rules", rules,
    )
    # warmup 2 of 4 steps, linear decay to 0.1: the factor at step 3 is 1.0
    assert resumed[3] == sorted(["adamw=0.01 muon=0.02 adamw=0.004", "muon=0.02 adamw=0.004"])


def test_two_node_launch_on_one_machine(tmp_path):
    """launch/multinode.sh twice (NODE_RANK 0 and 1, one process each) rendezvousing on 127.0.0.1."""
    port, dump = free_port(), tmp_path / "two_node"
    procs = []
    for node_rank in (0, 1):
        env = launch_env(tmp_path)
        env.update(NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   GPUS_PER_NODE="1", PYTHON=sys.executable)
        cmd = ["bash", str(REPO / "launch" / "multinode.sh"), "--job.config_file", str(DEBUG),
               "--job.dump_folder", str(dump), "--metrics.disable_color_printing",
               "--training.steps", "4", "--checkpoint.interval", "2"]
        log = tmp_path / f"node{node_rank}.log"
        procs.append((start(cmd, env, log), log))
    results = [finish(p, log) for p, log in procs]
    for node_rank, (rc, out) in enumerate(results):
        assert rc == 0, f"node {node_rank} failed (rc={rc}); log tail:\n{out[-8000:]}"
    loss = losses(results[0][1])
    assert sorted(loss) == [1, 2, 3, 4], results[0][1][-3000:]
    assert "dp_shard=2" in results[0][1], "the two nodes did not form one 2-rank job"
    assert_checkpoints(dump, [2, 4])


def test_bad_optimizer_setting_fails_at_startup(tmp_path):
    """An invalid [optimizer] value stops a torchrun launch before any training, naming the field.

    (Unknown fields and the other invalid values go through the same parse_config; they are
    covered in-process by test_torchtitan_config.py.)
    """
    args = train_args(DEBUG, tmp_path / "out", "--optimizer.momentum", "1.5")
    rc, out = run(torchrun("--standalone", "--nproc_per_node=2", *args), tmp_path, "bad")
    assert rc != 0
    assert "[optimizer] momentum: must be >= 0 and < 1, got 1.5" in out, out[-4000:]
    assert "Training starts" not in out
