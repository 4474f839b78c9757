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

from harness import TEST_TIMEOUT  # the overall limit, raisable by env; never a speed assumption

from dist_muon.numerics import newton_schulz as ns_mod
from dist_muon.numerics import triton_cache
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
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TEST_TIMEOUT,
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


class FakeCuda:
    """Stands in for a CUDA tensor so the dispatch rule can be checked without a GPU."""

    is_cuda = True

    def __init__(self, dtype, shape=(4096, 4096)):
        self.dtype, self.shape, self.ndim = dtype, tuple(shape), len(shape)


@pytest.fixture
def clean_dispatch_env(monkeypatch):
    for name in (tk.DISABLE_ENV, tk.MODE_ENV, tk.MIN_GRAM_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_use_triton_rules(clean_dispatch_env):
    monkeypatch = clean_dispatch_env
    assert tk.use_triton(torch.randn(4, 6)) is False  # CPU tensor
    assert tk.use_triton(FakeCuda(torch.bfloat16)) is tk.HAS_TRITON
    assert tk.use_triton(FakeCuda(torch.float64)) is False
    monkeypatch.setenv(tk.DISABLE_ENV, "1")
    assert tk.use_triton(FakeCuda(torch.bfloat16)) is False
    monkeypatch.setenv(tk.DISABLE_ENV, "0")
    assert tk.use_triton(FakeCuda(torch.bfloat16)) is tk.HAS_TRITON


# The H100 bf16 measurements the rule is derived from (wide view [..., s, l], faster path).
MEASURED = [
    ((4096, 4096), "triton"),
    ((1024, 4096), "torch"),
    ((4096, 14336), "triton"),  # 14336×4096, transposed
    ((16, 2048, 7168), "triton"),
    ((64, 1408, 2048), "triton"),
]


@pytest.mark.parametrize("shape,faster", MEASURED)
def test_dispatch_rule_picks_the_faster_path(clean_dispatch_env, shape, faster):
    assert tk.prefers_triton(shape) is (faster == "triton")
    assert tk.use_triton(FakeCuda(torch.bfloat16, shape)) is (tk.HAS_TRITON and faster == "triton")


def test_dispatch_rule_boundaries(clean_dispatch_env):
    assert tk.prefers_triton((4096, 4096)) and not tk.prefers_triton((4095, 4096))
    assert tk.prefers_triton((16, 1024, 4096))  # batched, 16·1024² = 4096²
    assert not tk.prefers_triton((2**20, 32, 4096))  # Gram side below the smallest tile
    clean_dispatch_env.setenv(tk.MIN_GRAM_ENV, "0")
    assert tk.prefers_triton((1024, 4096)) and not tk.prefers_triton((32, 4096))


@needs_triton
def test_dispatch_overrides(clean_dispatch_env):
    monkeypatch = clean_dispatch_env
    small, big = FakeCuda(torch.bfloat16, (1024, 4096)), FakeCuda(torch.bfloat16, (4096, 4096))
    monkeypatch.setenv(tk.MODE_ENV, "on")
    assert tk.use_triton(small) and tk.use_triton(big)
    assert not tk.use_triton(FakeCuda(torch.float64, (4096, 4096)))  # never for unsupported dtypes
    monkeypatch.setenv(tk.MODE_ENV, "off")
    assert not tk.use_triton(big)
    monkeypatch.setenv(tk.MODE_ENV, "auto")
    assert tk.use_triton(big) and not tk.use_triton(small)
    monkeypatch.setenv(tk.MODE_ENV, "on")
    monkeypatch.setenv(tk.DISABLE_ENV, "1")  # the old switch still wins
    assert not tk.use_triton(small)
    monkeypatch.delenv(tk.DISABLE_ENV)
    monkeypatch.setenv(tk.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match=tk.MODE_ENV):
        tk.use_triton(big)


# ---- tuning cache (CPU: files and the choice logic, no kernel launches) ---------------------

H100 = "NVIDIA H100 80GB HBM3"
CFG = {"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def _key(**over):
    args = dict(triton_version="3.9.0", device=H100, dtype=torch.bfloat16, kernel="gram-rm", M=4096, K=4096)
    return triton_cache.make_key(**{**args, **over})


# Subprocesses load triton_cache.py on its own: importing the package would import torch (slow).
_LOAD_CACHE_MODULE = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('triton_cache', {str(Path(triton_cache.__file__))!r})\n"
    "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
    "TuneCache, make_key = mod.TuneCache, mod.make_key\n"
)


def test_cache_keys_differ_by_every_field():
    keys = [
        _key(),
        _key(triton_version="3.6.0"),
        _key(device="NVIDIA H200"),
        _key(dtype=torch.float16),
        _key(kernel="poly-rm"),
        _key(M=1024),
        _key(K=14336),
    ]
    assert len(set(keys)) == len(keys)
    assert _key() == _key(dtype="torch.bfloat16")  # the same key whether given a dtype or its name


def test_cache_round_trip_across_objects_and_processes(tmp_path):
    triton_cache.TuneCache(H100, tmp_path).put(_key(), CFG)
    assert triton_cache.TuneCache(H100, tmp_path).get(_key()) == CFG
    assert triton_cache.TuneCache(H100, tmp_path).get(_key(M=1024)) is None
    other = triton_cache.TuneCache("NVIDIA A100-SXM4-80GB", tmp_path)
    assert other.path != triton_cache.TuneCache(H100, tmp_path).path and other.get(_key()) is None
    code = _LOAD_CACHE_MODULE + "import json\nprint(json.dumps(TuneCache(sys.argv[1], sys.argv[2]).get(sys.argv[3])))"
    proc = subprocess.run([sys.executable, "-c", code, H100, str(tmp_path), _key()],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == CFG


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"format": 999, "entries": {}}'])
def test_corrupt_cache_is_ignored_with_a_warning_and_repaired(tmp_path, garbage):
    cache = triton_cache.TuneCache(H100, tmp_path)
    cache.path.write_text(garbage)
    with pytest.warns(UserWarning, match="ignoring unreadable Triton tuning cache"):
        assert cache.get(_key()) is None
    with pytest.warns(UserWarning):  # put re-reads the bad file, then replaces it
        cache.put(_key(), CFG)
    assert triton_cache.TuneCache(H100, tmp_path).get(_key()) == CFG


def test_unwritable_cache_only_warns(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    cache = triton_cache.TuneCache(H100, blocker)
    with pytest.warns(UserWarning, match="could not write"):
        cache.put(_key(), CFG)
    assert cache.get(_key()) == CFG  # still remembered by this object


def test_concurrent_writers_keep_every_entry(tmp_path):
    code = _LOAD_CACHE_MODULE + (
        "for M in range(20):\n"
        "    c = TuneCache(sys.argv[1], sys.argv[2])\n"
        "    c.put(make_key(triton_version='x', device=sys.argv[1], dtype='bfloat16', kernel=sys.argv[3],"
        " M=M, K=1), {'BLOCK_M': M})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, H100, str(tmp_path), f"rank{r}"], cwd=REPO_ROOT)
             for r in range(4)]
    assert all(p.wait(timeout=TEST_TIMEOUT) == 0 for p in procs)
    entries = json.loads(triton_cache.TuneCache(H100, tmp_path).path.read_text())["entries"]
    assert len(entries) == 4 * 20
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture
def fresh_tuner(tmp_path, monkeypatch):
    monkeypatch.setenv(triton_cache.DIR_ENV, str(tmp_path))
    for name in (triton_cache.ENABLE_ENV, tk.AUTOTUNE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tk, "_TUNED", {})
    monkeypatch.setattr(tk, "_CACHES", {})
    return monkeypatch


def _never(cfg):
    raise AssertionError("must not tune again")


CANDIDATES = [(128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4)]
TIMES = {(128, 64, 8, 3): 2.0, (128, 32, 4, 4): 1.0, (64, 64, 4, 4): float("inf")}


def test_tuning_is_paid_once_per_machine(fresh_tuner, tmp_path):
    benched = []
    cfg = tk._pick(_key(), H100, CANDIDATES, lambda c: benched.append(c) or TIMES[c])
    assert cfg == (128, 32, 4, 4) and benched == CANDIDATES
    assert tk._pick(_key(), H100, CANDIDATES, _never) == cfg  # same process
    fresh_tuner.setattr(tk, "_TUNED", {})
    fresh_tuner.setattr(tk, "_CACHES", {})
    assert tk._pick(_key(), H100, CANDIDATES, _never) == cfg  # as a new process or rank would
    code = (
        "from dist_muon.numerics import triton_kernels as tk\n"
        "def never(c): raise AssertionError('tuned again')\n"
        f"print(tk._pick({_key()!r}, {H100!r}, {CANDIDATES!r}, never))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=TEST_TIMEOUT, env={**os.environ, triton_cache.DIR_ENV: str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(cfg)


def test_stale_cache_entry_is_retuned(fresh_tuner):
    triton_cache.TuneCache(H100).put(_key(), {"BLOCK_M": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3})
    assert tk._pick(_key(), H100, CANDIDATES, TIMES.get) == (128, 32, 4, 4)
    assert triton_cache.TuneCache(H100).get(_key()) == dict(zip(tk._FIELDS, (128, 32, 4, 4)))


def test_heuristic_tile_and_disabled_cache(fresh_tuner, tmp_path):
    fresh_tuner.setenv(tk.AUTOTUNE_ENV, "0")
    assert tk._pick(_key(), H100, CANDIDATES, _never) == CANDIDATES[0]
    fresh_tuner.setenv(tk.AUTOTUNE_ENV, "1")
    fresh_tuner.setenv(triton_cache.ENABLE_ENV, "0")
    assert tk._pick(_key(M=8192), H100, CANDIDATES, TIMES.get) == (128, 32, 4, 4)
    assert not list(tmp_path.iterdir())  # nothing written: neither the heuristic nor the disabled cache


def test_no_tuning_during_graph_capture(fresh_tuner):
    # Timing inside a CUDA-graph capture would break it: heuristic tile, not remembered.
    assert tk._pick(_key(), H100, CANDIDATES, _never, tune=False) == CANDIDATES[0]
    assert tk._pick(_key(), H100, CANDIDATES, TIMES.get) == (128, 32, 4, 4)  # tuned when eager
    assert tk._pick(_key(), H100, CANDIDATES, _never, tune=False) == (128, 32, 4, 4)


@needs_triton
def test_candidates_are_pruned():
    assert all(cfg[0] == 64 for cfg in tk._candidates(100, 2))  # small m: no 128-row tiles
    big16, big32 = tk._candidates(4096, 2), tk._candidates(4096, 4)
    assert (128, 128, 8, 3) in big16 and (128, 128, 8, 3) not in big32  # fp32 would overflow SMEM
    assert big16[0] == tk._CONFIGS[0]


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
    assert not tk.use_triton(X)  # too small for the size rule
    monkeypatch.setenv(tk.MODE_ENV, "on")
    assert tk.use_triton(X)
    Y = ns_mod.newton_schulz_iterations(X, schedule)
    monkeypatch.setenv(tk.DISABLE_ENV, "1")
    R = ns_mod.newton_schulz_iterations(X, schedule)
    R32 = ns_mod.newton_schulz_iterations(X.float(), schedule)
    if dtype == torch.float32:
        assert _rel(Y, R) <= 1e-5
    else:
        assert _rel(Y, R32) <= 2 * _rel(R, R32) + 1e-3


@needs_cuda
def test_cuda_tuning_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(triton_cache.DIR_ENV, str(tmp_path))
    monkeypatch.delenv(triton_cache.ENABLE_ENV, raising=False)
    monkeypatch.setattr(tk, "_TUNED", {})
    monkeypatch.setattr(tk, "_CACHES", {})
    X = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    A = tk.sym_gram(X)
    tk.sym_poly(A, -2.5, 0.75)
    entries = json.loads(triton_cache.TuneCache(torch.cuda.get_device_name()).path.read_text())["entries"]
    assert {k.split("|kernel=")[1].split("|")[0] for k in entries} == {"gram-rm", "poly-rm"}
    assert all(f"device={torch.cuda.get_device_name()}" in k and "M=300" in k for k in entries)
