"""Benchmark: full Newton–Schulz (5 polar_express steps) with the symmetric Triton kernels vs.
the plain torch path, on Llama-3 8B and MoE expert shapes, and what the dispatch rule picks.

    python benchmarks/triton_ns.py [--dtype bf16] [--iters 20] [--out results.json]

All three paths run the production loop (``newton_schulz.iterate_``): torch
(``DIST_MUON_TRITON=off``), Triton (``=on``) and dispatch (``=auto``, the size rule). Each case
also reports the cost of the first Triton call with an empty tuning cache (``tune_s``: compile
and time every candidate tile) and with the cache filled (``cached_first_call_s``), in a fresh
cache directory (``--cache-dir`` to use another).

Prints one JSON document. TFLOP/s use the nominal NS cost per step (m ≤ n after transposing
tall matrices): 2·m·m·n (X·Xᵀ) + 2·m·m·m (A·A) + 2·m·m·n (B·X), times the batch. The Triton
path does about half of the first two products (symmetry), so its "effective" TFLOP/s can
exceed what the hardware does. Correctness: both paths in the benchmark dtype are compared
with the torch path in fp32 on the same input. Without a CUDA GPU the script says so and
exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import dist_muon  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_muon.numerics import newton_schulz as ns
from dist_muon.numerics import triton_kernels as tk
from dist_muon.numerics.schedules import resolve_schedule

# (name, batch, rows, cols) as the weight is stored; tall ones are transposed for NS.
CASES = [
    ("llama3_8b.attn_q_o.4096x4096", 1, 4096, 4096),
    ("llama3_8b.attn_k_v.1024x4096", 1, 1024, 4096),
    ("llama3_8b.mlp_w1_w3.14336x4096", 1, 14336, 4096),
    ("llama3_8b.mlp_w2.4096x14336", 1, 4096, 14336),
    ("deepseek_v3.expert_w1_w3.16x2048x7168", 16, 2048, 7168),
    ("deepseek_v3.expert_w2.16x7168x2048", 16, 7168, 2048),
    ("moe.expert.64x1408x2048", 64, 1408, 2048),
]

# Dense (no sparsity) peak TFLOP/s for 16-bit tensor-core math, by device-name substring.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def ns_flops(batch: int, m: int, n: int, steps: int) -> float:
    return float(steps * batch * (2 * m * m * n + 2 * m * m * m + 2 * m * m * n))


def time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):  # the first call also runs Triton's autotuner for this shape
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm()).item()


@contextlib.contextmanager
def triton_mode(mode):
    old = {name: os.environ.pop(name, None) for name in (tk.DISABLE_ENV, tk.MODE_ENV)}
    os.environ[tk.MODE_ENV] = mode
    try:
        yield
    finally:
        for name, value in old.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def ns_path(mode):
    def run(X, schedule):
        with triton_mode(mode):
            return ns.newton_schulz_iterations(X, schedule)

    return run


torch_path, triton_path, dispatch_path = ns_path("off"), ns_path("on"), ns_path("auto")


def first_call_s(fn) -> float:
    """Wall time of a call after forgetting this process's tile choices (the disk cache stays)."""
    tk._TUNED.clear()
    tk._CACHES.clear()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(name, batch, rows, cols, dtype, schedule, args, peak):
    torch.manual_seed(0)
    G = torch.randn(batch, rows, cols, device="cuda", dtype=torch.float32)
    if rows > cols:  # as orthogonalize_with does: NS on the wide orientation
        G = G.mT
    m, n = G.shape[-2:]
    X = ns.normalize(G.to(dtype), schedule)
    if batch == 1:
        X = X[0]
    X = X.contiguous()

    tune_s = first_call_s(lambda: triton_path(X, schedule))  # the case's shapes are new to the cache
    cached_s = first_call_s(lambda: triton_path(X, schedule))
    t_torch = time_ms(lambda: torch_path(X, schedule), args.warmup, args.iters)
    t_triton = time_ms(lambda: triton_path(X, schedule), args.warmup, args.iters)
    t_dispatch = time_ms(lambda: dispatch_path(X, schedule), args.warmup, args.iters)
    with triton_mode("auto"):
        picked = "triton" if tk.use_triton(X) else "torch"

    # Correctness vs. the fp32 torch path on the same (rounded) input.
    ref = torch_path(X.float(), schedule)
    err_torch = rel_err(torch_path(X, schedule), ref)
    err_triton = rel_err(triton_path(X, schedule), ref)

    # Per-kernel timings for the first step (Gram and polynomial), both paths.
    _, b, c = schedule.coefficients[0]
    A = X @ X.mT
    kern = {
        "gram_torch_ms": time_ms(lambda: X @ X.mT, 2, args.iters),
        "gram_triton_ms": time_ms(lambda: tk.sym_gram(X), 2, args.iters),
        "poly_torch_ms": time_ms(
            lambda: torch.baddbmm(A, A, A, beta=b, alpha=c) if A.ndim == 3 else torch.addmm(A, A, A, beta=b, alpha=c),
            2,
            args.iters,
        ),
        "poly_triton_ms": time_ms(lambda: tk.sym_poly(A, b, c), 2, args.iters),
    }

    flops = ns_flops(batch, m, n, schedule.steps)
    out = {
        "case": name,
        "batch": batch,
        "weight_shape": [rows, cols],
        "ns_shape": [m, n],
        "dtype": str(dtype).removeprefix("torch."),
        "steps": schedule.steps,
        "nominal_gflop": flops / 1e9,
        "torch_ms": t_torch,
        "triton_ms": t_triton,
        "speedup": t_torch / t_triton,
        "dispatch_ms": t_dispatch,
        "dispatch_path": picked,
        "faster_path": "triton" if t_triton < t_torch else "torch",
        "dispatch_vs_best": t_dispatch / min(t_torch, t_triton),
        "tune_s": tune_s,
        "cached_first_call_s": cached_s,
        "torch_tflops": flops / t_torch / 1e9,
        "triton_tflops": flops / t_triton / 1e9,
        "rel_err_vs_fp32_torch": err_torch,
        "rel_err_vs_fp32_triton": err_triton,
        "correct": bool(err_triton <= 2.0 * err_torch + 1e-3),
        **kern,
    }
    if peak:
        out["torch_pct_peak"] = 100.0 * out["torch_tflops"] / peak
        out["triton_pct_peak"] = 100.0 * out["triton_tflops"] / peak
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--method", default="polar_express")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the dense 16-bit peak")
    p.add_argument("--cases", nargs="*", default=None, help="substrings selecting cases (default: all)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--cache-dir", default=None, help="tuning cache directory (default: a fresh temporary one)")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print(json.dumps({"status": "skipped", "reason": "no CUDA GPU available; nothing measured"}))
        return 0
    if not tk.HAS_TRITON:
        print(json.dumps({"status": "skipped", "reason": "triton is not importable; nothing measured"}))
        return 0

    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="dist_muon_tune_")
    os.environ[tk.triton_cache.DIR_ENV] = args.cache_dir or tmp.name
    dtype = DTYPES[args.dtype]
    schedule = resolve_schedule(args.method, args.steps)
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, args.peak_tflops)
    results = []
    for case in CASES:
        if args.cases and not any(s in case[0] for s in args.cases):
            continue
        results.append(run_case(*case, dtype, schedule, args, peak))
        torch.cuda.empty_cache()

    doc = {
        "status": "ok",
        "device": name,
        "peak_dense_16bit_tflops": peak,
        "torch": torch.__version__,
        "triton": getattr(tk.triton, "__version__", None),
        "method": args.method,
        "flops_per_step": "2*m*m*n + 2*m*m*m + 2*m*m*n per matrix (nominal, m <= n)",
        "tuning_cache": os.environ[tk.triton_cache.DIR_ENV],
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
