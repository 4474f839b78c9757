"""The benchmarks' process groups: the parent hosts the rendezvous store, every worker is its client.

As torchrun's agent does, the store listens before any worker starts. A port picked free for rank 0
to bind later can be taken in between by another process's outgoing connection (EADDRINUSE).
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

HOST = "127.0.0.1"


def store_server(world: int) -> dist.TCPStore:
    """The store, on a port of its own choosing (``.port``); keep it alive until the workers end."""
    return dist.TCPStore(HOST, 0, world, is_master=True, wait_for_workers=False)


def init_process_group(backend: str, rank: int, world: int, port: int, timeout_s: float) -> None:
    """Join the process group through the parent's store; every collective times out after ``timeout_s``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(HOST, port, world, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
