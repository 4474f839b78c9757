"""Triton kernels for Newton–Schulz that exploit the symmetry of the Gram matrix.

One NS step on a wide matrix X ([m, n], m ≤ n, or batched [B, m, n]) is

    A = X·Xᵀ                 (symmetric, m×m)
    B = b·A + c·A·A          (symmetric, since A·A = A·Aᵀ when A is symmetric)
    X = a·X + B·X

Both A and B are symmetric, so only the upper-triangular tiles (i, j ≥ i) are computed; every
program writes its accumulator to tile (i, j) and its transpose to tile (j, i). That halves the
FLOPs of the first two products. Because A is symmetric, A·A = A·Aᵀ, so ``sym_poly`` is the same
"rows times rows" kernel as ``sym_gram`` with an epilogue ``b·A + c·acc``. The last product,
``a·X + B·X``, is a plain GEMM and goes to cuBLAS (``torch.baddbmm``).

Accumulation is in fp32; outputs are in the input dtype (fp32, fp16 or bf16). fp32 inputs use
IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set (matching torch's own
fp32 matmul). Diagonal tiles are symmetrised (``(T + Tᵀ)/2``), so the outputs are exactly
symmetric.

Nothing here needs a GPU to import: without triton, ``HAS_TRITON`` is False and ``use_triton``
answers False, so ``newton_schulz.newton_schulz_iterations`` keeps its torch path. Under
``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors with small
fixed blocks; that is how the tests exercise them without a GPU.

Which stacks take this path (``use_triton``: a size rule measured on an H100) and how tiles are
chosen (timed once per device, dtype and shape, then read from ``triton_cache``'s file) are in
docs/triton.md.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Iterable, Sequence

import torch

from . import triton_cache

try:  # triton is optional: CPU-only installs and some platforms have none.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "DISABLE_ENV",
    "MODE_ENV",
    "MIN_GRAM_ENV",
    "AUTOTUNE_ENV",
    "use_triton",
    "prefers_triton",
    "sym_gram",
    "sym_poly",
    "newton_schulz_iterations_triton",
]

DISABLE_ENV = "DIST_MUON_DISABLE_TRITON"  # 1: always torch (same as DIST_MUON_TRITON=off)
MODE_ENV = "DIST_MUON_TRITON"  # auto (default): the size rule; on: always Triton; off: never
MIN_GRAM_ENV = "DIST_MUON_TRITON_MIN_GRAM"  # the rule's threshold on batch·s² (see prefers_triton)
AUTOTUNE_ENV = "DIST_MUON_TRITON_AUTOTUNE"  # 0: take the heuristic tile instead of timing candidates
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Measured on an H100 in bf16 (docs/triton.md): Triton loses 2x on a single 1024×4096
# (batch·s² = 2^20; probably too few output tiles for the SMs without split-K, plus launch
# overhead in a 0.5 ms call) and wins from one 4096×4096 Gram matrix (2^24) upwards. Nothing in
# between was measured, so the threshold sits at the smallest measured win: torch is the safe side.
DEFAULT_MIN_GRAM = 4096 * 4096
MIN_SIDE = 64  # the smallest tile; a smaller Gram side would be mostly padding
_MODES = {"auto": "auto", "": "auto", "1": "on", "on": "on", "0": "off", "off": "off"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _mode() -> str:
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return "off"
    value = os.environ.get(MODE_ENV, "auto").strip().lower()
    if value not in _MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected auto, on/1 or off/0")
    return _MODES[value]


def prefers_triton(shape: Sequence[int]) -> bool:
    """The size rule: Triton when the Gram side s = min(m, n) is at least 64 and the stack's
    Gram matrices hold at least ``DIST_MUON_TRITON_MIN_GRAM`` (default 4096²) entries in all."""
    *batch, m, n = shape
    s = min(m, n)
    return s >= MIN_SIDE and math.prod(batch) * s * s >= int(os.environ.get(MIN_GRAM_ENV, DEFAULT_MIN_GRAM))


def use_triton(X: torch.Tensor) -> bool:
    """Whether NS on ``X`` ([..., m, n]) should take the Triton path: a CUDA tensor of a
    supported dtype, triton importable, and ``DIST_MUON_TRITON`` on, or auto (the default) and
    ``prefers_triton(X.shape)``. ``DIST_MUON_DISABLE_TRITON=1`` forces the torch path."""
    if not (HAS_TRITON and X.is_cuda and X.dtype in SUPPORTED_DTYPES and X.ndim >= 2):
        return False
    mode = _mode()
    return mode == "on" or (mode == "auto" and prefers_triton(X.shape))


# Tile candidates (BLOCK_M, BLOCK_K, num_warps, num_stages); the first that survives pruning is
# also the untuned heuristic choice.
_FIELDS = ("BLOCK_M", "BLOCK_K", "num_warps", "num_stages")
_CONFIGS = [
    (128, 64, 8, 3),
    (128, 64, 4, 4),
    (128, 32, 4, 4),
    (128, 128, 8, 3),
    (64, 64, 4, 4),
    (64, 32, 4, 5),
]
_INTERP_CONFIG = (16, 16, 1, 1)  # the interpreter runs on numpy: small tiles, nothing to tune
_SMEM_BUDGET = 200 * 1024  # bytes of shared memory the operand pipeline may use (H100: 228 KiB)


def _candidates(M: int, elem: int) -> list:
    """Drop 128-row tiles for small matrices (they would leave most of the GPU idle) and configs
    whose operand pipeline cannot fit in shared memory (fp32 with big tiles)."""

    def fits(cfg):
        bm, bk, _, stages = cfg
        return 2 * bm * bk * elem * max(stages - 1, 1) <= _SMEM_BUDGET

    def small_enough(cfg):
        return cfg[0] <= max(64, triton.next_power_of_2(M) // 2)

    kept = [cfg for cfg in _CONFIGS if fits(cfg) and small_enough(cfg)]
    return kept or [min(_CONFIGS, key=lambda cfg: cfg[0] * cfg[1])]


_TUNED: dict = {}  # key -> config, for this process
_CACHES: dict = {}


def _disk_cache(device: str):
    if not triton_cache.enabled():
        return None
    where = (device, str(triton_cache.cache_dir()))
    if where not in _CACHES:
        _CACHES[where] = triton_cache.TuneCache(device)
    return _CACHES[where]


def _pick(key: str, device: str, candidates: list, bench, tune: bool = True) -> tuple:
    """The tile for ``key``: from this process, else from the disk cache, else by timing every
    candidate (``bench(cfg)`` -> ms) and storing the winner, so tuning is paid once per machine.
    With ``tune=False`` (during CUDA-graph capture, where timing would break the capture) a miss
    takes the heuristic tile without remembering it, so a later eager call still tunes."""
    if key in _TUNED:
        return _TUNED[key]
    cache = _disk_cache(device)
    hit = cache.get(key) if cache is not None else None
    cfg = tuple(hit.get(f) for f in _FIELDS) if isinstance(hit, dict) else None
    if cfg not in candidates:  # a miss, or an entry this version would not choose from: re-tune
        if not tune:
            return candidates[0]
        if len(candidates) == 1 or os.environ.get(AUTOTUNE_ENV, "1") in ("", "0"):
            cfg = candidates[0]
        else:
            times = [bench(c) for c in candidates]
            cfg = candidates[times.index(min(times))]
            if cache is not None:
                cache.put(key, dict(zip(_FIELDS, cfg)))
    _TUNED[key] = cfg
    return cfg


if HAS_TRITON:

    @triton.jit
    def _sym_rows_kernel(
        X,  # [B, M, K] input; for POLY it is A ([B, M, M], K == M)
        Out,  # [B, M, M] output
        M,
        K,
        stride_xb,
        stride_xm,
        stride_xk,
        stride_ob,
        stride_om,
        stride_on,
        beta,  # POLY: Out = beta·A + gamma·A·Aᵀ
        gamma,
        POLY: tl.constexpr,
        IEEE_FP32: tl.constexpr,
        ALLOW_TF32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        K_TILES: tl.constexpr,  # 0 on GPU; the K-tile count under the interpreter
    ):
        """Out[i, j] = X[i-rows] · X[j-rows]ᵀ for upper tiles j ≥ i, mirrored to (j, i)."""
        pid = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)

        # Linear id -> lower-triangular (r, c), c ≤ r, row by row: pid = r(r+1)/2 + c.
        # The float sqrt is corrected by one step either way, so it is exact for any grid size.
        r = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        r = tl.where(r * (r + 1) // 2 > pid, r - 1, r)
        r = tl.where((r + 1) * (r + 2) // 2 <= pid, r + 1, r)
        c = pid - r * (r + 1) // 2
        ti = c  # tile row
        tj = r  # tile column, tj >= ti

        X = X + pid_b * stride_xb
        Out = Out + pid_b * stride_ob

        rows_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        # Wrap out-of-range rows onto valid ones (their results are never stored): no row masks.
        li = rows_i % M
        lj = rows_j % M
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = X + li[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
        b_ptrs = X + offs_k[:, None] * stride_xk + lj[None, :] * stride_xm  # [BLOCK_K, BLOCK_M]

        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        # Triton 3.5/3.6's interpreter cannot use a runtime scalar as a range() bound (it calls
        # int() on a 1-element numpy array, an error in numpy 2.x), so there the count comes in as
        # a constexpr; it must stay inline, as the interpreter turns assigned values into tensors.
        # Compiled kernels keep the runtime bound: one binary for every K.
        for k in range(0, K_TILES if K_TILES else tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if IEEE_FP32:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            elif ALLOW_TF32:
                acc = tl.dot(a, b, acc, input_precision="tf32")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_xk
            b_ptrs += BLOCK_K * stride_xk

        if POLY:
            a_tile = tl.load(
                X + rows_i[:, None] * stride_xm + rows_j[None, :] * stride_xk,
                mask=(rows_i[:, None] < M) & (rows_j[None, :] < M),
                other=0.0,
            ).to(tl.float32)
            acc = beta * a_tile + gamma * acc

        acc_t = tl.trans(acc)
        mask_ij = (rows_i[:, None] < M) & (rows_j[None, :] < M)
        if ti == tj:
            # Diagonal tile: symmetrise so the output is exactly symmetric.
            sym = (acc + acc_t) * 0.5
            tl.store(
                Out + rows_i[:, None] * stride_om + rows_j[None, :] * stride_on,
                sym.to(Out.dtype.element_ty),
                mask=mask_ij,
            )
        else:
            tl.store(
                Out + rows_i[:, None] * stride_om + rows_j[None, :] * stride_on,
                acc.to(Out.dtype.element_ty),
                mask=mask_ij,
            )
            mask_ji = (rows_j[:, None] < M) & (rows_i[None, :] < M)
            tl.store(
                Out + rows_j[:, None] * stride_om + rows_i[None, :] * stride_on,
                acc_t.to(Out.dtype.element_ty),
                mask=mask_ji,
            )


def _check_input(X: torch.Tensor, name: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name}: triton is not importable")
    if X.ndim < 2:
        raise ValueError(f"{name}: expected [..., m, n], got shape {tuple(X.shape)}")
    if X.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {X.dtype} not supported (use float32, float16 or bfloat16)")
    if not X.is_cuda and not _interpreting():
        raise ValueError(f"{name}: needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")


def _as_batch(X: torch.Tensor) -> torch.Tensor:
    """[m, n] -> [1, m, n]; [..., m, n] -> [B, m, n] (a view when possible)."""
    if X.ndim == 2:
        return X.unsqueeze(0)
    if X.ndim == 3:
        return X
    return X.reshape(-1, *X.shape[-2:])


@functools.cache
def _device_name(index) -> str:  # looked up on every launch: keep it off the hot path
    return torch.cuda.get_device_name(index)


def _launch(X3: torch.Tensor, out: torch.Tensor, M: int, K: int, poly: bool, beta: float, gamma: float):
    ieee = X3.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    allow_tf32 = X3.dtype == torch.float32 and not ieee
    if _interpreting() and X3.dtype == torch.float32:
        ieee, allow_tf32 = True, False

    def run(cfg):
        bm, bk, warps, stages = cfg
        t = triton.cdiv(M, bm)
        _sym_rows_kernel[(t * (t + 1) // 2, X3.shape[0])](
            X3, out, M, K,
            X3.stride(0), X3.stride(1), X3.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            float(beta), float(gamma),
            POLY=poly, IEEE_FP32=ieee, ALLOW_TF32=allow_tf32, BLOCK_M=bm, BLOCK_K=bk,
            EVEN_K=K % bk == 0, K_TILES=triton.cdiv(K, bk) if _interpreting() else 0,
            num_warps=warps, num_stages=stages,
        )

    if _interpreting():
        return run(_INTERP_CONFIG)

    def bench(cfg):
        try:
            return triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=25)
        except Exception:  # a tile that does not compile or fit on this GPU is just not a candidate
            return float("inf")

    device = _device_name(X3.device.index)
    # Column-major rows (the X.mT views of tall stacks) load differently: tuned separately.
    layout = "cm" if X3.stride(1) == 1 and X3.stride(2) != 1 else "rm"
    kernel = f"{'poly' if poly else 'gram'}-{layout}{'-tf32' if allow_tf32 else ''}"
    key = triton_cache.make_key(
        triton_version=triton.__version__, device=device, dtype=X3.dtype, kernel=kernel, M=M, K=K
    )
    with torch.cuda.device(X3.device):
        tune = not torch.cuda.is_current_stream_capturing()
        run(_pick(key, device, _candidates(M, X3.element_size()), bench, tune))


def sym_gram(X: torch.Tensor, out: "torch.Tensor | None" = None) -> torch.Tensor:
    """``X @ X.mT`` for X of shape [m, n] or [..., m, n], computing only upper-triangular tiles.

    fp32 accumulation, output in X's dtype, exactly symmetric; ``out`` ([B, m, m]) is reused if given.
    """
    _check_input(X, "sym_gram")
    X3 = _as_batch(X)
    B, M, K = X3.shape
    out = torch.empty((B, M, M), device=X.device, dtype=X.dtype) if out is None else out
    if B > 0 and M > 0:
        if K == 0:
            out.zero_()
        else:
            _launch(X3, out, M, K, poly=False, beta=0.0, gamma=1.0)
    return out.reshape(*X.shape[:-2], M, M)


def sym_poly(A: torch.Tensor, b: float, c: float, out: "torch.Tensor | None" = None) -> torch.Tensor:
    """``b·A + c·A@A`` for symmetric A ([m, m] or [..., m, m]), upper-triangular tiles only.

    Computed as ``b·A + c·A·Aᵀ`` (equal for symmetric A) with fp32 accumulation; output in
    A's dtype, exactly symmetric. A must be symmetric; only its upper triangle is read in the
    epilogue.
    """
    _check_input(A, "sym_poly")
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"sym_poly: A must be square, got shape {tuple(A.shape)}")
    A3 = _as_batch(A)
    B, M, _ = A3.shape
    out = torch.empty((B, M, M), device=A.device, dtype=A.dtype) if out is None else out
    if B > 0 and M > 0:
        _launch(A3, out, M, M, poly=True, beta=b, gamma=c)
    return out.reshape(A.shape)


def _coefficients(coefficients) -> Sequence[tuple[float, float, float]]:
    coeffs = getattr(coefficients, "coefficients", coefficients)  # a Schedule works too
    return [tuple(float(v) for v in t) for t in coeffs]


def newton_schulz_iterations_triton(
    X: torch.Tensor, coefficients: "Iterable[Sequence[float]]"
) -> torch.Tensor:
    """Same contract as ``newton_schulz.newton_schulz_iterations(X, schedule)``.

    X is wide (rows ≤ cols), of shape [m, n] or [B, m, n] (more leading dims are flattened and
    restored), already normalised, in the NS compute dtype; ``coefficients`` is the schedule's
    list of (a, b, c) triples (a ``Schedule`` is accepted too). Per step:
    ``A = X·Xᵀ; B = b·A + c·A·A; X = a·X + B·X``, the first two on symmetric Triton kernels.
    """
    _check_input(X, "newton_schulz_iterations_triton")
    shape = X.shape
    X3 = _as_batch(X)
    if X3.numel() == 0:
        return X.clone()
    for a, b, c in _coefficients(coefficients):
        A = sym_gram(X3)
        Bm = sym_poly(A, b, c)
        X3 = torch.baddbmm(X3, Bm, X3, beta=a)
    return X3.reshape(shape)
