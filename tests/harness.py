"""A pool of gloo worker processes, started once per test module, that runs a function on every rank.

Functions must be importable module-level callables (they are pickled by name). A rank that
raises makes ``run`` raise with that rank's traceback; a rank that hangs makes ``run`` raise
after ``timeout`` seconds and the pool is torn down (the next ``run`` starts a fresh one).
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import traceback

import torch.multiprocessing as mp

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
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
    def __init__(self, world: int):
        self.world = world
        self.procs = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self.tasks = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, self.world, port, self.tasks[r], self.results), daemon=True)
            for r in range(self.world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = 180, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank; returns the per-rank results, or raises RankFailure."""
        if not self.procs or not all(p.is_alive() for p in self.procs):
            self.close()
            self._start()
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out, failures = {}, {}
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{fn.__name__}: a rank did not answer within {timeout}s (hang?)") from None
            (out if ok else failures)[rank] = value
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
        self.procs = []
