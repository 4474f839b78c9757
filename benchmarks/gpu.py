"""GPU optimizer-step benchmark at W=1: DistMuon (eager and CUDA graph) vs torch.optim.Muon and peers.

    python -m benchmarks.gpu [--stack llama moe] [--steps 20] [--json out.json]

Stacks (as in the engine issue): ``llama`` = Llama-3-8B matrices × 4 layers (28 matrices);
``moe`` = 4 layers × w1/w3/w2 as ``[64, 1408, 2048]`` experts (768 matrices). Fixed random
gradients, bf16 Newton–Schulz, 5 steps, Nesterov, momentum 0.95. Per implementation: median step
time over ``--steps`` warm steps (CUDA-synchronised), the transient memory of one step (the CUDA
allocator's peak above what existed before it, ``benchmarks.measure``), and the NS floor: the same
matrices' Newton–Schulz as one batched call per shape. Peers that are not installed (microsoft/dion) are
reported as skipped with the reason; torchtitan 0.3.0's built-in DistMuon is timed by
``benchmarks/builtin_distmuon.py`` in its own environment. Kernel TFLOP/s per shape:
``python benchmarks/triton_ns.py``. Without CUDA the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import dist_muon as dm
from dist_muon.numerics import resolve_schedule
from dist_muon.numerics.newton_schulz import orthogonalize_stack

from .measure import peak_transient_bytes

STACKS = {
    "llama": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)] * 4,
    "moe": [(64, 1408, 2048), (64, 1408, 2048), (64, 2048, 1408)] * 4,
}


def _params(shapes, flatten_experts: bool) -> list[nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for shape in shapes:
        t = torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32) * 0.02
        if flatten_experts and t.ndim == 3:  # torch.optim.Muon takes 2D parameters only
            out.extend(nn.Parameter(x.clone()) for x in t)
        else:
            out.append(nn.Parameter(t))
    return out


def _time_ms(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _measure(make, shapes, flatten_experts, steps, place=None) -> dict:
    params = _params(shapes, flatten_experts)
    if place is not None:  # e.g. distribute over a device mesh (benchmarks.builtin_distmuon)
        params = place(params)
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):  # warm-up: autotuning, graph capture
        opt.step()
    return {"step_ms": _time_ms(opt.step, steps), "transient_bytes": peak_transient_bytes(opt.step, "cuda")}


def _ns_floor_ms(shapes, steps) -> float:
    schedule = resolve_schedule("polar_express", 5)
    by_shape: dict[tuple, int] = {}
    for s in shapes:
        m, n = s[-2:]
        by_shape[(m, n)] = by_shape.get((m, n), 0) + (s[0] if len(s) == 3 else 1)
    stacks = [torch.randn(k, m, n, device="cuda", dtype=torch.bfloat16) for (m, n), k in by_shape.items()]
    return _time_ms(lambda: [orthogonalize_stack(s.clone(), schedule) for s in stacks], steps)


def implementations():
    common = dict(lr=0.02, momentum=0.95, ns_dtype=torch.bfloat16)
    yield "dist_muon", False, lambda ps: dm.DistMuon([{"params": ps, "algorithm": "muon"}], **common)
    yield "dist_muon_cuda_graph", False, lambda ps: dm.DistMuon([{"params": ps, "algorithm": "muon"}], cuda_graph=True,
                                                               **common)
    if hasattr(torch.optim, "Muon"):
        yield "torch.optim.Muon", True, lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.95)
    try:
        from dion import Muon as DionMuon  # microsoft/dion

        yield "dion.Muon", False, lambda ps: DionMuon(ps, lr=0.02, mu=0.95)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        yield "dion.Muon", None, f"skipped: microsoft/dion not importable ({type(e).__name__}: {e})"
    # torchtitan 0.3.0's built-in DistMuon needs its own environment (this one has torchtitan 0.2.2) and DTensor
    # parameters with per-FQN layouts: benchmarks/builtin_distmuon.py times it against DistMuon.
    yield "torchtitan.DistMuon", None, ("skipped: measured by `torchrun -m benchmarks.builtin_distmuon` in a "
                                        "torchtitan 0.3.0 environment (docs/benchmarks.md)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stack", nargs="+", default=list(STACKS), choices=list(STACKS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here; nothing measured")
        return
    rows = []
    for stack in args.stack:
        shapes = STACKS[stack]
        floor = _ns_floor_ms(shapes, args.steps)
        for name, flatten, make in implementations():
            row = {"stack": stack, "implementation": name, "ns_floor_ms": floor}
            if flatten is None:
                row["status"] = make
            else:
                try:
                    row.update(_measure(make, shapes, flatten, args.steps), status="ok")
                except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
                    row["status"] = f"failed: {type(e).__name__}: {e}"
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
