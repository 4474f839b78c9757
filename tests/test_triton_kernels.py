"""Tests for the symmetric Triton NS kernels (dist_muon/numerics/triton_kernels.py).

Without a GPU the kernels run under the Triton interpreter. TRITON_INTERPRET must be set
before triton is imported, so the interpreter checks run in ONE subprocess (the rest of the
pytest session keeps a normal triton import) that prints a JSON list of relative errors; the
tests below assert on them. The interpreter's bf16 ``tl.dot`` is broken, so CPU runs cover
fp32 and fp16; bf16 is covered by the CUDA-only tests at the bottom.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dist_muon.numerics import newton_schulz as ns_mod
from dist_muon.numerics import triton_kernels as tk
from dist_muon.numerics.schedules import resolve_schedule

REPO_ROOT = Path(__file__).resolve().parents[1]

needs_triton = pytest.mark.skipif(not tk.HAS_TRITON, reason="triton is not importable")

# Relative Frobenius-error bounds vs. the torch path.
TOL = {"float32": 1e-5, "float16": 1e-3}
# A full 5-step NS amplifies rounding; fp16 gets a looser, still fp16-level bound.
NS_TOL = {"float32": 1e-5, "float16": 5e-3}

_INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from dist_muon.numerics.triton_kernels import sym_gram, sym_poly, newton_schulz_iterations_triton
    from dist_muon.numerics.newton_schulz import newton_schulz_iterations, normalize
    from dist_muon.numerics.schedules import resolve_schedule

    def rel(x, ref):
        x, ref = x.double(), ref.double()
        return float((x - ref).norm() / ref.norm().clamp_min(1e-30))

    torch.manual_seed(0)
    out = []
    schedule = resolve_schedule("polar_express", 5)
    b, c = schedule.coefficients[0][1], schedule.coefficients[0][2]
    gram_shapes = [(37, 70), (64, 200), (3, 48, 96), (2, 2, 20, 30), (90, 20), (5, 5)]
    for dtype in (torch.float32, torch.float16):
        name = str(dtype).removeprefix("torch.")
        for shape in gram_shapes:
            X = torch.randn(shape, dtype=torch.float32).to(dtype)
            X = X / X.float().norm(dim=(-2, -1), keepdim=True).to(dtype)  # NS-like scale
            A = sym_gram(X)
            A_ref = X @ X.mT  # the torch path, same dtype
            P = sym_poly(A, b, c)
            P_ref = b * A.float() + c * (A.float() @ A.float())  # same A, exact fp32 math
            out.append(dict(
                kind="gram", dtype=name, shape=list(shape),
                out_shape=list(A.shape), out_dtype=str(A.dtype),
                rel=rel(A, A_ref), rel_fp32=rel(A, X.float() @ X.float().mT),
                symmetric=bool(torch.equal(A, A.mT)),
            ))
            out.append(dict(
                kind="poly", dtype=name, shape=list(A.shape),
                out_shape=list(P.shape), out_dtype=str(P.dtype),
                rel=rel(P, P_ref), symmetric=bool(torch.equal(P, P.mT)),
            ))
        # Full NS, 5 polar_express steps, vs. the torch loop on the same normalised input.
        for shape, transpose in [((24, 40), False), ((2, 20, 33), False), ((44, 28), True)]:
            X = torch.randn(shape)
            if transpose:  # tall -> wide as orthogonalize_with does: a non-contiguous view
                X = X.mT
            X = normalize(X.to(dtype), schedule)
            Y = newton_schulz_iterations_triton(X, schedule.coefficients)
            # A Schedule is accepted in place of its coefficient list (checked once).
            Y_sched = newton_schulz_iterations_triton(X, schedule) if shape == (24, 40) else Y
            R = newton_schulz_iterations(X, schedule)  # torch path (CPU tensor)
            R32 = newton_schulz_iterations(X.float(), schedule)
            out.append(dict(
                kind="ns", dtype=name, shape=list(X.shape),
                out_shape=list(Y.shape), out_dtype=str(Y.dtype),
                rel=rel(Y, R), rel_fp32=rel(Y, R32), torch_rel_fp32=rel(R, R32),
                same_with_schedule=bool(torch.equal(Y, Y_sched)),
            ))
    print("RESULTS=" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interp_results():
    if not tk.HAS_TRITON:
        pytest.skip("triton is not importable")
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.pop(tk.DISABLE_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS="))
    return json.loads(line.removeprefix("RESULTS="))


def _select(results, kind, dtype):
    rows = [r for r in results if r["kind"] == kind and r["dtype"] == dtype]
    assert rows, (kind, dtype)
    return rows


@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sym_gram_matches_torch(interp_results, dtype):
    for r in _select(interp_results, "gram", dtype):
        m = r["shape"][-2]
        assert r["out_shape"] == r["shape"][:-1] + [m], r
        assert r["out_dtype"] == f"torch.{dtype}", r
        assert r["rel"] <= TOL[dtype], r
        assert r["symmetric"], r
        if dtype == "float16":  # fp32 accumulation: no worse than the fp16 output rounding
            assert r["rel_fp32"] <= 1e-3, r


@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sym_poly_matches_torch(interp_results, dtype):
    for r in _select(interp_results, "poly", dtype):
        assert r["out_shape"] == r["shape"], r
        assert r["out_dtype"] == f"torch.{dtype}", r
        assert r["rel"] <= TOL[dtype], r
        assert r["symmetric"], r


@needs_triton
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_full_newton_schulz_matches_torch(interp_results, dtype):
    for r in _select(interp_results, "ns", dtype):
        assert r["out_shape"] == r["shape"], r
        assert r["out_dtype"] == f"torch.{dtype}", r
        assert r["rel"] <= NS_TOL[dtype], r
        assert r["same_with_schedule"], r
        if dtype == "float16":  # not worse than torch's own fp16 loop (vs. fp32), with slack
            assert r["rel_fp32"] <= 2 * r["torch_rel_fp32"] + 1e-3, r


# ---- dispatch (runs in this process, no interpreter) --------------------------------------


def test_dispatch_uses_torch_path_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors")

    monkeypatch.setattr(tk, "newton_schulz_iterations_triton", boom)
    schedule = resolve_schedule("polar_express", 5)
    X = ns_mod.normalize(torch.randn(3, 8, 12), schedule)
    assert not tk.use_triton(X)
    Y = ns_mod.newton_schulz_iterations(X, schedule)
    # Same as the plain torch loop.
    R = X
    for a, b, c in schedule.coefficients:
        A = R @ R.mT
        R = a * R + (b * A + c * A @ A) @ R
    torch.testing.assert_close(Y, R, rtol=1e-5, atol=1e-5)


def test_use_triton_rules(monkeypatch):
    X = torch.randn(4, 6)
    assert tk.use_triton(X) is False  # CPU tensor
    # Emulate a CUDA tensor to check the other conditions without a GPU.
    class FakeCuda:
        is_cuda = True
        ndim = 2

        def __init__(self, dtype):
            self.dtype = dtype

    monkeypatch.delenv(tk.DISABLE_ENV, raising=False)
    assert tk.use_triton(FakeCuda(torch.bfloat16)) is tk.HAS_TRITON
    assert tk.use_triton(FakeCuda(torch.float64)) is False
    monkeypatch.setenv(tk.DISABLE_ENV, "1")
    assert tk.use_triton(FakeCuda(torch.bfloat16)) is False
    monkeypatch.setenv(tk.DISABLE_ENV, "0")
    assert tk.use_triton(FakeCuda(torch.bfloat16)) is tk.HAS_TRITON


# ---- real GPU (skipped without CUDA) ------------------------------------------------------

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and tk.HAS_TRITON), reason="needs CUDA + triton")


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 70), (300, 1000), (3, 130, 257), (1024, 4096)])
def test_cuda_kernels(dtype, shape):
    torch.manual_seed(0)
    X = torch.randn(shape, device="cuda", dtype=dtype)
    X = X / X.float().norm(dim=(-2, -1), keepdim=True).to(dtype)
    A = tk.sym_gram(X)
    assert A.dtype == dtype and torch.equal(A, A.mT)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert _rel(A, X.float() @ X.float().mT) <= tol
    P = tk.sym_poly(A, -2.5, 0.75)
    assert P.dtype == dtype and torch.equal(P, P.mT)
    Af = A.float()
    assert _rel(P, -2.5 * Af + 0.75 * Af @ Af) <= tol


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dispatch_and_full_ns(dtype, monkeypatch):
    schedule = resolve_schedule("polar_express", 5)
    X = ns_mod.normalize(torch.randn(4, 96, 200, device="cuda").to(dtype), schedule)
    monkeypatch.delenv(tk.DISABLE_ENV, raising=False)
    assert tk.use_triton(X)
    Y = ns_mod.newton_schulz_iterations(X, schedule)
    monkeypatch.setenv(tk.DISABLE_ENV, "1")
    R = ns_mod.newton_schulz_iterations(X, schedule)
    R32 = ns_mod.newton_schulz_iterations(X.float(), schedule)
    if dtype == torch.float32:
        assert _rel(Y, R) <= 1e-5
    else:
        assert _rel(Y, R32) <= 2 * _rel(R, R32) + 1e-3
