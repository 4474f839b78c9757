"""A fork server for the tests' torchtitan launches: ``launch.train`` on N ranks without N fresh interpreters.

Why: importing torch + torchtitan (+ datasets, inductor, pandas) costs a fresh process ~9 s of CPU;
the suite launches the 2-rank trainer dozens of times on a 2-core CI machine, where those imports
were most of its wall time. This server imports everything once (after the CPU shims, exactly as
``launch.train.main`` orders it: modules imported before the shims would keep a "cuda"
``device_type``), then forks each job's ranks from that state. A job is still N separate
processes with their own gloo process group, each running ``launch.train.main(argv)`` with the
environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...): only the
interpreter start-up is shared. The README's own ``torchrun`` commands keep being tested as they are
(tests/test_torchtitan_e2e.py).

Run by ``tests/harness.py`` (``ForkServer``) as ``python tests/rank_forkserver.py``, with the
environment of the torchtitan it should serve (0.2.2: the main one; 0.3.0: its PYTHONPATH).
Protocol, one JSON object a line: the client writes ``{"nproc", "argv", "env", "log", "cwd"}``;
the server answers ``{"pid": leader}``. The leader is a process in a session of its own (the
client kills the job with ``killpg``); it forks the ranks, waits for them, ends the others at the
first failure (as torchrun does), then writes the job's exit code to ``<log>.rc``. Every process
dies with its parent (``PR_SET_PDEATHSIG``): the client, then the server, then a leader.
CPU only: the tests that use it are skipped where CUDA is available.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def preload() -> None:
    """What ``launch.train.main`` does before parsing its arguments: shims first, then torchtitan."""
    from launch import cpu_shims, cpu_shims_030, train

    (cpu_shims_030 if train.torchtitan_version()[:2] == (0, 3) else cpu_shims).activate()
    import torch.distributed.checkpoint  # noqa: F401
    import torchtitan.train  # noqa: F401

    import dist_muon.integrations.torchtitan  # noqa: F401


def run_rank(rank: int, nproc: int, port_pipe: int, request: dict) -> int:
    """One rank: torchrun's environment, ``launch.train.main``; its output goes where the leader's does (the log)."""
    die_with_parent()
    with os.fdopen(port_pipe) as f:  # the leader's store port, once it listens (see lead)
        port = f.read().strip()
    if not port:
        return 1
    os.environ.update(request["env"])
    # As under torchrun: the store is the launcher's (the agent store), every rank is its client.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TORCHELASTIC_USE_AGENT_STORE="True")
    os.chdir(request["cwd"])
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    sys.argv = ["launch.train", *request["argv"]]
    code = 0
    try:
        from launch import train

        train.main(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed as an uncaught exception would be
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def lead(request: dict) -> None:
    """The job: fork the ranks, wait; at the first failing rank end the rest (torchrun's policy)."""
    die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # off the server's pipes: the client must see EOF when the server dies, whatever jobs remain
    devnull, log = os.open(os.devnull, os.O_RDONLY), os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    nproc = int(request["nproc"])
    ranks, port_pipes = {}, []
    for rank in range(nproc):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            for w in [write_end, *port_pipes]:
                os.close(w)
            os._exit(run_rank(rank, nproc, read_end, request))
        os.close(read_end)
        ranks[pid] = rank
        port_pipes.append(write_end)
    # The rendezvous store is the leader's, as torchrun's agent hosts it, and listens before any rank
    # learns its port: a port picked free and bound later by rank 0 was taken in between (EADDRINUSE)
    # by another job's outgoing gloo connections. Created after the forks: its server thread is not
    # forked with the ranks.
    from benchmarks.rendezvous import store_server  # the repo is on sys.path once serve() started

    store = store_server(nproc)
    for w in port_pipes:
        os.write(w, f"{store.port}\n".encode())
        os.close(w)
    code = 0
    while ranks:
        pid, status = os.wait()
        ranks.pop(pid, None)
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0 and code == 0:
            code = rc if rc > 0 else 128 - rc
            print(f"\n[rank_forkserver] rank exited with code {rc}; ending ranks {sorted(ranks.values())}", flush=True)
            for other in ranks:
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    del store
    tmp = request["log"] + ".rc.tmp"
    with open(tmp, "w") as f:
        f.write(str(code))
    os.replace(tmp, request["log"] + ".rc")


def serve() -> None:
    die_with_parent()
    sys.path.insert(0, REPO)
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # leaders are reaped by the kernel
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            try:
                lead(request)
            finally:
                os._exit(0)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    serve()
