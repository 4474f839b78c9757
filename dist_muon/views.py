"""How a parameter is a batch of independent matrices, and each matrix's lr scale.

Every matrix of a view is a box (a ``[start, stop)`` range per tensor dim) in the
parameter's global index space. Reshaping the box's contents to ``[m, n]`` folds the
dims up to ``row_dim`` into rows and the rest into columns. Boxes tile the tensor
exactly, so a distributed engine only needs to intersect boxes with shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

ADJUST_LR = ("original", "match_rms_adamw", None)

Region = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class MatrixView:
    """A parameter of ``shape`` seen as ``len(regions)`` matrices of shape ``matrix_shapes[i]``."""

    shape: tuple[int, ...]
    row_dim: int
    regions: tuple[Region, ...]
    matrix_shapes: tuple[tuple[int, int], ...]

    @property
    def num_matrices(self) -> int:
        return len(self.regions)

    @property
    def row_norm_dims(self) -> tuple[int, ...]:
        """Tensor dims that make up one row of a matrix (Muown's per-row norms)."""
        return tuple(range(self.row_dim + 1, len(self.shape)))

    def describe(self) -> str:
        shapes = sorted(set(self.matrix_shapes), key=self.matrix_shapes.index)
        return " + ".join(f"{self.matrix_shapes.count(s)}×{s[0]}×{s[1]}" for s in shapes)


def lr_scale(m: int, n: int, adjust_lr: Optional[str]) -> float:
    """s(m, n) of docs/update_rule.md, from the matrix's own shape."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, m / n))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if adjust_lr is None:
        return 1.0
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR}, got {adjust_lr!r}")


def _row_blocks(
    rows: int, num_experts: Optional[int], split_sizes: Optional[Sequence[int]], num_heads: Optional[int], name: str
) -> list[tuple[int, int]]:
    """Split ``rows`` into experts (equal), then each expert into split_sizes or heads."""
    experts = num_experts or 1
    if rows % experts:
        raise ValueError(f"{name}: num_experts={experts} does not divide dim 0 of size {rows}")
    per_expert = rows // experts
    if split_sizes is not None and num_heads is not None:
        raise ValueError(f"{name}: give split_sizes or num_heads, not both")
    if split_sizes is not None:
        sizes = [int(s) for s in split_sizes]
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"{name}: split_sizes must be positive integers, got {tuple(split_sizes)}")
        if sum(sizes) != per_expert:
            where = "each expert's rows" if num_experts else "dim 0"
            raise ValueError(
                f"{name}: split_sizes {tuple(sizes)} sum to {sum(sizes)} but {where} has size {per_expert}; "
                "fix split_sizes so they add up (e.g. (q, kv, kv) rows of a fused QKV weight)"
            )
    elif num_heads is not None:
        if num_heads <= 0 or per_expert % num_heads:
            raise ValueError(f"{name}: num_heads={num_heads} does not divide {per_expert} rows")
        sizes = [per_expert // num_heads] * num_heads
    else:
        sizes = [per_expert]
    blocks, start = [], 0
    for _ in range(experts):
        for s in sizes:
            blocks.append((start, start + s))
            start += s
    return blocks


def _check_positive(name: str, key: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")


def build_view(
    shape: Sequence[int],
    *,
    name: str = "parameter",
    num_experts: Optional[int] = None,
    split_sizes: Optional[Sequence[int]] = None,
    num_heads: Optional[int] = None,
    flatten: bool = False,
) -> MatrixView:
    """The matrices of a parameter of ``shape``.

    - 2D ``[M, N]``: one matrix, or row blocks by ``num_experts`` / ``split_sizes`` / ``num_heads``;
    - 3D ``[E, M, N]``: one matrix per expert (row blocks within each expert allowed);
    - ND (ndim ≥ 4, or 3D with ``flatten=True``): conv-style, ``[shape[0], prod(shape[1:])]``.
    """
    shape = tuple(int(s) for s in shape)
    _check_positive(name, "num_experts", num_experts)
    _check_positive(name, "num_heads", num_heads)
    if len(shape) < 2:
        raise ValueError(
            f"{name}: shape {shape} has fewer than 2 dims and cannot be orthogonalized; route it to 'adamw'"
        )
    if any(s == 0 for s in shape):
        raise ValueError(f"{name}: shape {shape} has an empty dim")
    full = tuple((0, s) for s in shape)
    if len(shape) >= 4 or (len(shape) == 3 and flatten):
        if num_experts or split_sizes or num_heads:
            raise ValueError(f"{name}: views options do not apply to a flattened {len(shape)}D weight")
        return MatrixView(shape, 0, (full,), ((shape[0], math.prod(shape[1:])),))
    if len(shape) == 2:
        blocks = _row_blocks(shape[0], num_experts, split_sizes, num_heads, name)
        regions = tuple(((r0, r1), (0, shape[1])) for r0, r1 in blocks)
        return MatrixView(shape, 0, regions, tuple((r1 - r0, shape[1]) for r0, r1 in blocks))
    experts, rows, cols = shape
    if num_experts is not None and num_experts != experts:
        raise ValueError(f"{name}: num_experts={num_experts} but the 3D weight has {experts} experts in dim 0")
    blocks = _row_blocks(rows, None, split_sizes, num_heads, name)
    regions = tuple(((e, e + 1), (r0, r1), (0, cols)) for e in range(experts) for r0, r1 in blocks)
    matrix_shapes = tuple((r1 - r0, cols) for _ in range(experts) for r0, r1 in blocks)
    return MatrixView(shape, 1, regions, matrix_shapes)


def row_statistic_shape(view: MatrixView) -> tuple[int, ...]:
    """Shape of a per-row statistic of a parameter (NorMuon's second moment): column dims become 1."""
    return tuple(s if d <= view.row_dim else 1 for d, s in enumerate(view.shape))


def rows_view(view: MatrixView, width: int = 1) -> MatrixView:
    """The per-row statistic of every matrix of ``view``, as a view of a tensor shaped like
    ``row_statistic_shape`` whose last dim is ``width`` elements wide (``width`` > 1 when fp32
    values travel as 2-byte elements): matrix i is an ``m_i × width`` box beside matrix i's rows."""
    ndim = len(view.shape)
    shape = tuple(s if d <= view.row_dim else (width if d == ndim - 1 else 1) for d, s in enumerate(view.shape))

    def collapse(region):
        return tuple(r if d <= view.row_dim else ((0, width) if d == ndim - 1 else (0, 1)) for d, r in enumerate(region))

    return MatrixView(shape, view.row_dim, tuple(collapse(r) for r in view.regions),
                      tuple((m, width) for m, _ in view.matrix_shapes))
