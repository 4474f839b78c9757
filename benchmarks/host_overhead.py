"""Host overhead of one optimizer step on many tiny matrices, measured from the outside.

    python -m benchmarks.host_overhead [--counts 250 1000 4000] [--json out.json]

For N tiny 32×64 matrices (separate parameters, so per-parameter host work shows), in one
process and under FSDP2 at W=2 (gloo on CPU, NCCL on CUDA), it reports per warm step:

* ``ops``: dispatched aten ops (a ``TorchDispatchMode``; each is at least one kernel launch on a GPU);
* ``step_ms``: wall-clock median of the step;
* ``ns_floor_ms``: the same matrices' Newton–Schulz as one batched call on one stack, the
  compute no step can avoid (at W=2: the rank's half of them);
* ``transient_bytes``: peak allocator bytes during the step above what existed before it
  (the CUDA allocator's peak; on CPU the profiler's allocation record);

and, in one process, the same numbers for ``torch.optim.Muon`` side by side.
Every process uses one thread (``torch.set_num_threads(1)``) so results do not depend on how
busy the other cores are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dist_muon as dm
from dist_muon.numerics import resolve_schedule
from dist_muon.numerics.newton_schulz import orthogonalize_stack

from . import rendezvous
from .measure import count_ops, peak_transient_bytes

SHAPE = (32, 64)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _params(n: int, device) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(*SHAPE, generator=g).to(device)) for _ in range(n)]


def _measure(opt: torch.optim.Optimizer, params, floor_matrices: int, device, reps: int) -> dict:
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(2):
        opt.step()
    stack = torch.randn(max(floor_matrices, 1), *SHAPE, device=device, dtype=_ns_dtype(device))
    schedule = resolve_schedule("polar_express", 5)
    return {
        "ops": count_ops(opt.step).total,
        "step_ms": _median_ms(opt.step, device, reps),
        "ns_floor_ms": _median_ms(lambda: orthogonalize_stack(stack.clone(), schedule), device, reps),
        "transient_bytes": peak_transient_bytes(opt.step, device),
    }


def _ns_dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def single_process(n: int, reps: int) -> dict:
    device = _device()
    params = _params(n, device)
    ours = dm.DistMuon([{"params": params, "algorithm": "muon"}], lr=0.02)
    out = {"dist_muon": _measure(ours, params, n, device, reps)}
    if hasattr(torch.optim, "Muon"):
        params = _params(n, device)
        out["torch.optim.Muon"] = _measure(torch.optim.Muon(params, lr=0.02), params, n, device, reps)
    return out


def _fsdp_worker(rank: int, world: int, port: int, n: int, reps: int, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    rendezvous.init_process_group("nccl" if cuda else "gloo", rank, world, port, 300)
    try:
        device = _device()
        module = nn.Module()
        for i, p in enumerate(_params(n, device)):
            module.register_parameter(f"w{i}", p)
        fully_shard(module, mesh=init_device_mesh(device.type, (world,)))
        params = list(module.parameters())
        opt = dm.DistMuon([{"params": params, "algorithm": "muon"}], lr=0.02)
        owned = sum(m.owner == rank for m in opt.plan.matrices)
        result = _measure(opt, params, owned, device, reps)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def fsdp(n: int, reps: int, world: int = 2) -> dict:
    store = rendezvous.store_server(world)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_fsdp_worker, args=(world, store.port, n, reps, queue), nprocs=world, join=True,
                       start_method="spawn")
    return {"dist_muon": queue.get()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[250, 1000, 4000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for n in args.counts:
        for layout, run in (("1 process", single_process), ("FSDP W=2", fsdp)):
            for impl, r in run(n, args.reps).items():
                rows.append({"matrices": n, "layout": layout, "implementation": impl, **r})
                print(f"{n:5d}  {layout:9s}  {impl:16s}  ops {r['ops']:6d}  step {r['step_ms']:8.2f} ms  "
                      f"NS floor {r['ns_floor_ms']:8.2f} ms  transient {r['transient_bytes'] / 2**20:7.2f} MiB",
                      flush=True)
    if args.json:
        meta = {"device": str(_device()), "torch": torch.__version__, "shape": SHAPE, "threads": 1}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
