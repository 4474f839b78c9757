"""Crash recovery under torchrun: a killed rank restarts from the last complete checkpoint.

(The end of the file checks the test harness's own crash and hang detection.)

Runs ``examples/train_fsdp.py`` three times at once (2 ranks each, gloo, --max-restarts 1):
uninterrupted; rank 1 SIGKILLed before step 5 (checkpoints every 3 steps: resumes from step 3);
rank 0 SIGKILLed while the step-6 checkpoint is being written (its ``step-6.tmp`` is never used:
resumes from step 3). All three must end with the same parameters.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time

import pytest
import torch

from harness import COLLECTIVE_TIMEOUT, DistributedPool, Job, Launcher, RankFailure, ephemeral_ports, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train_fsdp.py")
STEPS = 8


def _launch(launcher: Launcher, tmp, name: str, fault: str | None) -> tuple[Job, str]:
    out = os.path.join(tmp, name)
    os.makedirs(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    env.pop("DIST_MUON_FAULT", None)
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    if fault:
        env["DIST_MUON_FAULT"] = fault
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        SCRIPT, "--steps", str(STEPS), "--ckpt-dir", os.path.join(out, "ckpt"), "--ckpt-every", "3",
        "--ns-dtype", "float32", "--final-out", os.path.join(out, "final.pt"),
        "--collective-timeout", str(COLLECTIVE_TIMEOUT),
    ]
    return launcher.start(cmd, os.path.join(out, "log.txt"), env=env, name=f"crash-recovery run {name!r}"), out


def _finish(job: Job, out: str) -> str:
    rc, log = job.wait()
    assert rc == 0, f"torchrun failed (rc {rc}):\n{log[-6000:]}"
    last_attempt = log[log.rfind("attempt "):]
    assert "terminate called" not in last_attempt, f"a rank aborted at exit:\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("crash"))
    launcher = Launcher(REPO)
    try:
        launched = {
            "clean": _launch(launcher, tmp, "clean", None),
            "killed_in_step": _launch(launcher, tmp, "killed_in_step", "1:5"),
            "killed_in_save": _launch(launcher, tmp, "killed_in_save", "0:6:save"),
        }
        yield {name: (out, _finish(job, out)) for name, (job, out) in launched.items()}
    finally:
        launcher.close()


def _final(out: str) -> dict:
    return torch.load(os.path.join(out, "final.pt"))


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        err = float((got[k].double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-30))
        assert err <= 1e-5, f"{k}: relative error {err:.2e} vs the uninterrupted run"


def test_uninterrupted_run(runs):
    out, log = runs["clean"]
    assert "attempt 0: starting from scratch" in log and "[fault injection]" not in log
    assert "attempt 1" not in log, f"the uninterrupted run was restarted:\n{log[-6000:]}"
    assert "muon" in log and "adamw" in log  # the routing report


def test_rank_killed_mid_training_resumes_from_last_checkpoint(runs):
    out, log = runs["killed_in_step"]
    assert "[fault injection] killing rank 1 at step 5 (train)" in log, log[-4000:]
    assert re.search(r"attempt 1: resumed from step 3", log), log[-4000:]
    _assert_same(_final(out), _final(runs["clean"][0]))


def test_rank_killed_while_saving_never_uses_the_partial_checkpoint(runs):
    out, log = runs["killed_in_save"]
    assert "[fault injection] killing rank 0 at step 6 (save)" in log, log[-4000:]
    # step-6.tmp was fully written by dcp.save but never committed: the restart resumes from step 3
    assert re.search(r"attempt 1: resumed from step 3", log), log[-4000:]
    assert "resumed from step 6" not in log
    _assert_same(_final(out), _final(runs["clean"][0]))
    ckpts = sorted(os.listdir(os.path.join(out, "ckpt")))
    assert ckpts == ["step-3", "step-6", "step-8"], ckpts  # the restart re-saved step 6 cleanly


# ----------------------------------------------------------------------------- the harness's hang detection


def _rank_0_waits_for_a_barrier_rank_1_never_joins():
    import torch.distributed as dist

    if dist.get_rank() == 0:
        dist.barrier()
    return "returned"


def test_a_rank_stuck_in_a_collective_fails_the_call():
    """The collective timeout ends the wait (5 s here: rank 1 never comes, whatever the machine's speed)."""
    pool = DistributedPool(2, collective_timeout=5)
    try:
        with pytest.raises(RankFailure) as info:
            pool.run(_rank_0_waits_for_a_barrier_rank_1_never_joins)
    finally:
        pool.close()
    assert set(info.value.failures) == {0}, info.value
    assert "timed out" in info.value.failures[0].lower(), info.value


def _rank_1_dies():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)
    return "alive"


def test_a_rank_that_dies_fails_the_call_at_once():
    pool = DistributedPool(2)
    try:
        with pytest.raises(RankFailure, match=r"rank 1 died \(exit code 3\)"):
            pool.run(_rank_1_dies)
    finally:
        pool.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killing_a_job_kills_the_children_in_their_own_sessions(tmp_path):
    """torchrun starts its workers in sessions of their own: killing its process group would leave them running."""
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(10**6)'], start_new_session=True)\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(10**6)\n")
    launcher = Launcher(REPO)
    try:
        job = launcher.start([sys.executable, "-c", script], tmp_path / "job.log", env=dict(os.environ))
        while not job.text().strip():
            assert job.proc.poll() is None, job.text()
            time.sleep(0.1)
        child = int(job.text().split()[0])
        assert _running(child) and os.getsid(child) == child
    finally:
        launcher.close()
    assert job.proc.returncode is not None
    while _running(child):  # SIGKILLed: gone as soon as the kernel has reaped it
        time.sleep(0.1)


def test_a_free_port_for_torchrun_is_outside_the_ephemeral_range():
    """Outgoing connections (other jobs' gloo) take ephemeral ports: one picked there was gone before torchrun bound it."""
    ephemeral = ephemeral_ports()
    if ephemeral.start <= 10000 and ephemeral.stop > 65535:
        pytest.skip(f"this machine's ephemeral range {ephemeral.start}-{ephemeral.stop - 1} leaves no other port")
    for _ in range(20):
        port = free_port()
        assert port not in ephemeral
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
