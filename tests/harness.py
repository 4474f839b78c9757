"""Process helpers for the tests: a pool of gloo workers, and launched jobs (torchrun) that never outlive a test.

No test depends on how fast the machine is. Hangs are detected, not timed:

* every process group (pool workers, launched jobs) has a collective timeout, ``COLLECTIVE_TIMEOUT``:
  a rank stuck in a collective raises instead of waiting forever;
* a watchdog polls the processes: a worker or a job that dies fails the test at once, naming it;
* one generous overall limit, ``TEST_TIMEOUT`` (also pytest-timeout's per-test limit, see
  conftest.py), is the last resort. Both limits are environment variables, for very slow machines:
  ``DIST_MUON_TEST_TIMEOUT`` (default 900 s) and ``DIST_MUON_COLLECTIVE_TIMEOUT`` (default 300 s).

Pool functions must be importable module-level callables (they are pickled by name).

Launched torchtitan jobs come in two kinds: ``torchrun`` commands (``Launcher.start``), for what
the README tells users to run, and ``launch.train`` on N ranks forked from a ``ForkServer`` that
has torch and torchtitan imported already (``Launcher.start_ranks``; see rank_forkserver.py), for
the many short runs that compare layouts, resumes and settings.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid

import torch.multiprocessing as mp

from benchmarks import rendezvous

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TEST_TIMEOUT = float(os.environ.get("DIST_MUON_TEST_TIMEOUT", "900"))
COLLECTIVE_TIMEOUT = float(os.environ.get("DIST_MUON_COLLECTIVE_TIMEOUT", "300"))
POLL = 0.5  # watchdog period: how soon a dead process is noticed


def ephemeral_ports() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def free_port() -> int:
    """A port free now, for a launcher (torchrun) that binds it later, outside the ephemeral range where possible.

    Outgoing connections (gloo's, of jobs running meanwhile) take their ports from the ephemeral range;
    a port picked there by the kernel can be taken before the launcher binds it (EADDRINUSE).
    """
    ephemeral = ephemeral_ports()
    candidates = [p for p in range(10000, 65536) if p not in ephemeral]
    for port in random.SystemRandom().sample(candidates, min(64, len(candidates))):  # whatever a test seeded
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _over_limit(what: str) -> str:
    return (f"{what} did not finish within DIST_MUON_TEST_TIMEOUT={TEST_TIMEOUT:g}s although no collective timed "
            f"out (DIST_MUON_COLLECTIVE_TIMEOUT={COLLECTIVE_TIMEOUT:g}s); on a very slow machine raise "
            "DIST_MUON_TEST_TIMEOUT")


# ----------------------------------------------------------------------------- worker pool


def _worker(rank: int, world: int, port: int, timeout: float, tasks, results) -> None:
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rendezvous.init_process_group("gloo", rank, world, port, timeout)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent with its traceback
            results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class RankFailure(RuntimeError):
    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        super().__init__("\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items())))


class DistributedPool:
    """``world`` gloo worker processes, started on first use and reused; ``run`` calls a function on every rank.

    Workers are forked from multiprocessing's fork server, which has imported what every worker
    imports (pool_preload.py): a fresh interpreter's imports cost seconds of CPU per worker, and
    the suite starts a few dozen pools on two cores. A forked worker is still a process of its own.

    A rank that raises makes ``run`` raise with its traceback. A rank that dies, or a rank that is still
    silent a collective timeout after another rank failed (hung), tears the pool down (the next ``run``
    starts a fresh one) and fails with a message naming it.
    """

    def __init__(self, world: int, collective_timeout: float = COLLECTIVE_TIMEOUT):
        self.world, self.collective_timeout = world, collective_timeout
        self.procs = []

    def _start(self) -> None:
        ctx = mp.get_context("forkserver")
        # Python 3.11's fork server does not take the parent's sys.path: it finds tests/ by PYTHONPATH
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if TESTS_DIR not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, *paths]))
        ctx.set_forkserver_preload(["pool_preload"])  # once per session: the server starts on first use
        # The store listens here before any worker starts (as torchrun's agent hosts it): a port picked
        # free for rank 0 to bind later can be taken in between by other gloo connections (EADDRINUSE).
        self.store = rendezvous.store_server(self.world)
        self.tasks = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, self.world, self.store.port, self.collective_timeout, self.tasks[r],
                                              self.results),
                        daemon=True)
            for r in range(self.world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank; returns the per-rank results, or raises RankFailure."""
        if not self.procs or not all(p.is_alive() for p in self.procs):
            self.close()
            self._start()
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out, failures = {}, {}
        deadline = time.monotonic() + TEST_TIMEOUT
        while len(out) + len(failures) < self.world:
            try:
                rank, ok, value = self.results.get(timeout=POLL)
            except queue.Empty:
                pending = [r for r in range(self.world) if r not in out and r not in failures]
                dead = {r: self.procs[r].exitcode for r in pending if not self.procs[r].is_alive()}
                if dead:
                    self.close()
                    raise RankFailure({**failures, **{r: f"{fn.__name__}: rank {r} died (exit code {code})"
                                                      for r, code in dead.items()}})
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"{fn.__name__}: ranks {pending} hung: " + _over_limit("the call"))
                continue
            (out if ok else failures)[rank] = value
            if failures:  # the others fail too within a collective timeout, unless they are hung
                deadline = min(deadline, time.monotonic() + self.collective_timeout + 60)
        if failures:
            raise RankFailure(failures)
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        for q in getattr(self, "tasks", []):
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs, self.store = [], None


# ----------------------------------------------------------------------------- launched jobs


REPO = os.path.dirname(TESTS_DIR)


def launch_env(hf_home) -> dict[str, str]:
    """The environment of launched torchtitan jobs: the repo importable, one thread, nothing downloads."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])),
        HF_HOME=str(hf_home),  # datasets' cache of the local JSON
        HF_HUB_OFFLINE="1",  # prove nothing downloads
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return env


def collective_timeout_args() -> list[str]:
    """torchtitan's flags that bound every collective of a launched job (its hang detection)."""
    t = str(int(COLLECTIVE_TIMEOUT))
    return ["--comm.init_timeout_seconds", t, "--comm.train_timeout_seconds", t]


JOB_TAG = "DIST_MUON_TEST_JOB"


def _tagged(tag: str) -> list[int]:
    """Pids of the processes whose environment carries ``JOB_TAG=tag``: a job and everything it started.

    The environment is inherited whatever happens to the process tree: torchrun starts its workers in
    sessions of their own, and a worker outliving torchrun is reparented.
    """
    needle = f"{JOB_TAG}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def kill_job(tag: str) -> None:
    """SIGKILL every process of a job; all are stopped first so none can notice and start another."""
    for _ in range(10):
        pids = _tagged(tag)
        if not pids:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        time.sleep(0.1)  # let the kernel reap them before looking again


class _LoggedJob:
    """What both kinds of job share: a name, a log, and waiting under the overall limit."""

    name: str
    log: str

    def _wait_until(self, finished) -> None:
        """Poll ``finished()``; past the overall limit the job is killed and the test fails with its log tail."""
        deadline = time.monotonic() + TEST_TIMEOUT
        while not finished():
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(_over_limit(self.name) + f"; log tail:\n{self.text()[-5000:]}")
            time.sleep(POLL)

    def text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


class Job(_LoggedJob):
    """A launched command (own session, output to ``log``); ``wait`` watches it, ``kill`` ends all of it."""

    def __init__(self, cmd: list[str], log, *, env: dict[str, str], cwd: str, name: str):
        self.name, self.log = name, str(log)
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex}"
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env={**env, JOB_TAG: self.tag}, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> tuple[int, str]:
        """(return code, log)."""
        self._wait_until(lambda: self.proc.poll() is not None)
        self.kill()  # whatever the job left behind (a worker orphaned by a crashed torchrun)
        return self.proc.returncode, self.text()

    def kill(self) -> None:
        kill_job(self.tag)
        self.proc.wait()
        self._out.close()


class ForkServer:
    """``tests/rank_forkserver.py`` running in ``env`` (the torchtitan version it serves is the one
    that environment imports); ``start`` forks a job's ranks from it. ``close`` ends the server and
    every job it started: forked processes keep the server's environment, tag included."""

    def __init__(self, env: dict[str, str], cwd: str):
        self.env, self.cwd, self.proc = env, cwd, None
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex}"

    def _ensure_running(self) -> None:
        """The server starts on the first job (seconds of imports that tests without jobs never pay)."""
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, os.path.join(TESTS_DIR, "rank_forkserver.py")],
                                         cwd=self.cwd, env={**self.env, JOB_TAG: self.tag}, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, start_new_session=True)
            self._reply("start-up")

    def _reply(self, what: str) -> dict:
        line = self.proc.stdout.readline()  # the server prints nothing else on this pipe
        if not line:
            raise RuntimeError(f"the rank fork server died during {what} (exit code {self.proc.wait()}); its "
                               "output is on the test's stderr")
        return json.loads(line)

    def start(self, nproc: int, argv: list[str], log, *, env: dict[str, str], name: str) -> "ForkedJob":
        """``launch.train.main(argv)`` on ``nproc`` ranks; ``env``: what the ranks add to the server's environment."""
        self._ensure_running()
        for stale in (str(log), f"{log}.rc"):
            if os.path.exists(stale):
                os.remove(stale)
        self.proc.stdin.write(json.dumps({"nproc": nproc, "argv": argv, "env": env, "log": str(log),
                                          "cwd": self.cwd}) + "\n")
        self.proc.stdin.flush()
        return ForkedJob(self._reply(f"the start of {name}")["pid"], str(log), name)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            kill_job(self.tag)
            self.proc.wait()
            self.proc = None


class ForkedJob(_LoggedJob):
    """A job of a ForkServer: its leader's session holds the ranks; the leader writes ``<log>.rc`` at the end."""

    def __init__(self, leader: int, log: str, name: str):
        self.leader, self.log, self.name = leader, log, name
        self.rc_file = log + ".rc"

    def _alive(self) -> bool:
        try:
            os.kill(self.leader, 0)
            return True
        except ProcessLookupError:
            return False

    def wait(self) -> tuple[int, str]:
        """(exit code, log), as ``Job.wait``."""
        self._wait_until(lambda: os.path.exists(self.rc_file) or not self._alive())
        self.kill()
        if not os.path.exists(self.rc_file):
            raise RuntimeError(f"{self.name}: the job's leader died without an exit code; log tail:\n"
                               f"{self.text()[-5000:]}")
        with open(self.rc_file) as f:
            return int(f.read()), self.text()

    def kill(self) -> None:
        try:
            os.killpg(self.leader, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Launcher:
    """Starts jobs and kills whatever is left of them at ``close`` (a fixture finalizer): nothing outlives a test.

    ``forkserver``: where ``start_ranks`` forks its jobs from (shared by the launchers of a session)."""

    def __init__(self, cwd: str, forkserver: ForkServer | None = None):
        self.cwd, self.jobs, self.forkserver = cwd, [], forkserver

    def start(self, cmd: list[str], log, *, env: dict[str, str], name: str = "") -> Job:
        job = Job(cmd, log, env=env, cwd=self.cwd, name=name or os.path.basename(str(log)))
        self.jobs.append(job)
        return job

    def start_ranks(self, nproc: int, argv: list[str], log, *, env: dict[str, str] | None = None,
                    name: str = "") -> ForkedJob:
        """``torchrun --standalone --nproc_per_node nproc -m launch.train *argv``, forked from the fork server."""
        job = self.forkserver.start(nproc, argv, log, env=env or {}, name=name or os.path.basename(str(log)))
        self.jobs.append(job)
        return job

    def close(self) -> None:
        for job in self.jobs:
            job.kill()
        self.jobs = []
