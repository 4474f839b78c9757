"""Does torch.compile of dist_muon's ``newton_schulz_iterations`` pay here? (measurement only)

    python -m benchmarks.compile_ns [--threads 1] [--json PATH]

Times eager vs ``torch.compile(newton_schulz_iterations)`` on the 'small' model's matrix shapes
(bf16, quintic, 5 steps, batched as DistMuon batches them) after warmup, and reports compile time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dist_muon.numerics import resolve_schedule
from dist_muon.numerics.newton_schulz import newton_schulz_iterations, normalize

SHAPES = [(2, 1024, 1024), (2, 256, 1024), (3, 1024, 2752)]  # (batch, m, n): wq/wo, wk/wv, w1/w3/w2ᵀ


def bench(fn, X, schedule, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(X, schedule)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    schedule = resolve_schedule("quintic", 5)
    compiled = torch.compile(newton_schulz_iterations)
    rows = []
    for b, m, n in SHAPES:
        X = normalize(torch.randn(b, m, n).bfloat16(), schedule)
        newton_schulz_iterations(X, schedule)
        t0 = time.perf_counter()
        compiled(X, schedule)
        compile_s = time.perf_counter() - t0
        eager = bench(newton_schulz_iterations, X, schedule, args.reps)
        comp = bench(compiled, X, schedule, args.reps)
        err = float((compiled(X, schedule).float() - newton_schulz_iterations(X, schedule).float()).norm()
                    / newton_schulz_iterations(X, schedule).float().norm())
        rows.append(dict(shape=[b, m, n], eager_s=eager, compiled_s=comp, speedup=eager / comp,
                         first_call_s=compile_s, rel_diff=err))
        print(f"{(b, m, n)}: eager {eager:.3f}s compiled {comp:.3f}s (x{eager / comp:.2f}), "
              f"first compiled call {compile_s:.1f}s, rel diff {err:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
