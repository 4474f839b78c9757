"""How a parameter is a batch of independent matrices, and each matrix's lr scale.

Every matrix of a view is an ordered set of row blocks (``RowSet``): each block is a box (a
``[start, stop)`` range per tensor dim) in the parameter's global index space, and the blocks
stacked along ``row_dim`` in order form the matrix. Most matrices are one block; a matrix of an
interleaved fused weight (torchtitan's llama3 ``wqkv``: per KV group, Q rows then K then V)
takes one block from every repeat. Reshaping the stacked box to ``[m, n]`` folds the dims up to
``row_dim`` into rows and the rest into columns. The blocks of all matrices tile the tensor
exactly, so a distributed engine only needs to intersect blocks with shards. With
``matrix_blocks`` some blocks of a fused weight are no matrices (their rows go to an elementwise
algorithm): the view lists the matrix blocks and says which rows it leaves out (``excluded_rows``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

ADJUST_LR = ("original", "match_rms_adamw", None)

Region = tuple[tuple[int, int], ...]
RowRanges = tuple[tuple[int, int], ...]  # one matrix's [start, stop) row ranges, in stacking order


@dataclass(frozen=True)
class RowSet:
    """One matrix: the row blocks of the parameter (boxes) stacked in this order along ``row_dim``."""

    blocks: tuple[Region, ...]
    row_dim: int

    def _rows(self, block: Region) -> int:
        start, stop = block[self.row_dim]
        return stop - start

    @property
    def box_shape(self) -> tuple[int, ...]:
        """The stacked blocks as one box: a block's shape with the rows of all blocks."""
        shape = [b - a for a, b in self.blocks[0]]
        shape[self.row_dim] = sum(self._rows(b) for b in self.blocks)
        return tuple(shape)

    @property
    def row_offsets(self) -> tuple[int, ...]:
        """Where each block starts along ``row_dim`` in the stacked box."""
        return tuple(itertools.accumulate((self._rows(b) for b in self.blocks[:-1]), initial=0))


@dataclass(frozen=True)
class MatrixView:
    """A parameter of ``shape`` seen as ``len(row_sets)`` matrices of shape ``matrix_shapes[i]``."""

    shape: tuple[int, ...]
    row_dim: int
    row_sets: tuple[RowSet, ...]
    matrix_shapes: tuple[tuple[int, int], ...]
    # [start, stop) ranges along row_dim that belong to no matrix (sorted, merged; every expert / lead)
    excluded_rows: tuple[tuple[int, int], ...] = ()

    @property
    def num_matrices(self) -> int:
        return len(self.row_sets)

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


def _pattern(per_expert: int, split_sizes: Optional[Sequence[int]], num_heads: Optional[int],
             interleave: Optional[int], name: str, where: str) -> list[int]:
    """Rows of each matrix in one repeat of an expert's rows (one repeat unless ``interleave``)."""
    if split_sizes is not None and num_heads is not None:
        raise ValueError(f"{name}: give split_sizes or num_heads, not both")
    if interleave is not None and num_heads is not None:
        raise ValueError(f"{name}: interleave goes with split_sizes, not num_heads: each head's rows are contiguous "
                         "even in an interleaved layout, so num_heads alone already cuts per head")
    if interleave is not None and split_sizes is None:
        raise ValueError(f"{name}: interleave={interleave} needs split_sizes, the row pattern that repeats "
                         "(e.g. split_sizes=(heads_per_kv*head_dim, head_dim, head_dim), interleave=n_kv_heads)")
    repeats = interleave or 1
    if split_sizes is not None:
        sizes = [int(s) for s in split_sizes]
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"{name}: split_sizes must be positive integers, got {tuple(split_sizes)}")
        if sum(sizes) * repeats != per_expert:
            raise _uncovered_rows(name, tuple(sizes), interleave, where, per_expert)
        return sizes
    if num_heads is not None:
        if num_heads <= 0 or per_expert % num_heads:
            raise ValueError(f"{name}: num_heads={num_heads} does not divide {per_expert} rows")
        return [per_expert // num_heads] * num_heads
    return [per_expert]


def _uncovered_rows(name: str, sizes: tuple[int, ...], interleave: Optional[int], where: str, rows: int) -> ValueError:
    """split_sizes (repeated ``interleave`` times) that do not add up to the rows, and the fix."""
    if interleave is None:
        return ValueError(f"{name}: split_sizes {sizes} sum to {sum(sizes)} but {where} has size {rows}; "
                          "fix split_sizes so they add up (e.g. (q, kv, kv) rows of a fused QKV weight)")
    return ValueError(
        f"{name}: split_sizes {sizes} sum to {sum(sizes)}, × interleave={interleave} to {sum(sizes) * interleave}, "
        f"but {where} has size {rows}; fix them so sum(split_sizes) * interleave adds up (e.g. "
        "(heads_per_kv*head_dim, head_dim, head_dim) × n_kv_heads of an interleaved wqkv)"
    )


def _row_ranges(rows: int, num_experts: Optional[int], split_sizes: Optional[Sequence[int]],
                num_heads: Optional[int], interleave: Optional[int], name: str) -> list[RowRanges]:
    """Split ``rows`` into experts (equal), then each expert into split_sizes or heads; with
    ``interleave`` the split_sizes pattern repeats and matrix j takes block j of every repeat."""
    experts = num_experts or 1
    if rows % experts:
        raise ValueError(f"{name}: num_experts={experts} does not divide dim 0 of size {rows}")
    per_expert = rows // experts
    where = "each expert's rows" if num_experts else "dim 0"
    sizes = _pattern(per_expert, split_sizes, num_heads, interleave, name, where)
    period, starts = sum(sizes), list(itertools.accumulate(sizes, initial=0))
    return [
        tuple((e * per_expert + r * period + start, e * per_expert + r * period + start + size)
              for r in range(interleave or 1))
        for e in range(experts) for start, size in zip(starts, sizes)
    ]


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
    interleave: Optional[int] = None,
    flatten: bool = False,
    matrix_blocks: Optional[Sequence[bool]] = None,
) -> MatrixView:
    """The matrices of a parameter of ``shape``.

    - 2D ``[M, N]``: one matrix, or row blocks by ``num_experts`` / ``split_sizes`` / ``num_heads``;
      ``interleave=R`` with ``split_sizes``: the rows (of each expert) are R repeats of the
      split_sizes pattern and matrix j is block j of every repeat, in repeat order;
    - 3D ``[E, M, N]``: one matrix per expert (row blocks within each expert allowed);
    - ND (ndim ≥ 4, or 3D with ``flatten=True``): conv-style, ``[shape[0], prod(shape[1:])]``.

    ``matrix_blocks`` (one bool per ``split_sizes`` block): only the True blocks are matrices; the
    rows of the others are ``excluded_rows`` (a fused weight whose blocks get different algorithms).
    """
    shape = tuple(int(s) for s in shape)
    _check_positive(name, "num_experts", num_experts)
    _check_positive(name, "num_heads", num_heads)
    _check_positive(name, "interleave", interleave)
    if len(shape) < 2:
        raise ValueError(
            f"{name}: shape {shape} has fewer than 2 dims and cannot be orthogonalized; route it to 'adamw'"
        )
    if any(s == 0 for s in shape):
        raise ValueError(f"{name}: shape {shape} has an empty dim")
    if matrix_blocks is not None:
        _check_matrix_blocks(name, matrix_blocks, split_sizes)
    if len(shape) >= 4 or (len(shape) == 3 and flatten):
        if num_experts or split_sizes or num_heads or interleave:
            raise ValueError(f"{name}: views options do not apply to a flattened {len(shape)}D weight")
        full = tuple((0, s) for s in shape)
        return MatrixView(shape, 0, (RowSet((full,), 0),), ((shape[0], math.prod(shape[1:])),))
    if len(shape) == 2:
        view = _row_set_view(shape, [()], _row_ranges(shape[0], num_experts, split_sizes, num_heads, interleave, name))
    else:
        experts, rows, _ = shape
        if num_experts is not None and num_experts != experts:
            raise ValueError(f"{name}: num_experts={num_experts} but the 3D weight has {experts} experts in dim 0")
        view = _row_set_view(shape, [((e, e + 1),) for e in range(experts)],
                             _row_ranges(rows, None, split_sizes, num_heads, interleave, name))
    return view if matrix_blocks is None else _only_blocks(view, tuple(bool(b) for b in matrix_blocks))


def _check_matrix_blocks(name: str, matrix_blocks: Sequence[bool], split_sizes: Optional[Sequence[int]]) -> None:
    if split_sizes is None:
        raise ValueError(f"{name}: per-block algorithms need split_sizes, the row blocks they name")
    if len(matrix_blocks) != len(split_sizes):
        raise ValueError(f"{name}: {len(matrix_blocks)} block algorithms for {len(split_sizes)} split_sizes blocks "
                         f"{tuple(split_sizes)}; give one per block")
    if not any(matrix_blocks):
        raise ValueError(f"{name}: no block is a matrix; route the whole parameter to 'adamw' instead")


def _only_blocks(view: MatrixView, keep: tuple[bool, ...]) -> MatrixView:
    """The matrices of ``view`` whose block (matrix index modulo the pattern) is kept, and the rows of
    the others. Matrices are ordered (lead or expert, block), so block j is matrix index % len(keep)."""
    kept = [i for i in range(view.num_matrices) if keep[i % len(keep)]]
    dropped = sorted({b[view.row_dim] for i in range(view.num_matrices) if not keep[i % len(keep)]
                      for b in view.row_sets[i].blocks})
    merged: list[list[int]] = []
    for a, b in dropped:
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return MatrixView(view.shape, view.row_dim, tuple(view.row_sets[i] for i in kept),
                      tuple(view.matrix_shapes[i] for i in kept), tuple((a, b) for a, b in merged))


def _row_set_view(shape: tuple[int, ...], leads: Sequence[Region], per_lead: Sequence[RowRanges]) -> MatrixView:
    """The matrices of rows ``per_lead`` (all columns) within each leading box: one for a 2D weight,
    one per expert of a 3D one. Rows are dim -2."""
    row_dim, cols = len(shape) - 2, (0, shape[-1])
    row_sets = tuple(RowSet(tuple(lead + (rows, cols) for rows in ranges), row_dim)
                     for lead in leads for ranges in per_lead)
    return MatrixView(shape, row_dim, row_sets, tuple((rs.box_shape[row_dim], shape[-1]) for rs in row_sets))


def row_statistic_shape(view: MatrixView) -> tuple[int, ...]:
    """Shape of a per-row statistic of a parameter (NorMuon's second moment): column dims become 1."""
    return tuple(s if d <= view.row_dim else 1 for d, s in enumerate(view.shape))


def rows_view(view: MatrixView, width: int = 1) -> MatrixView:
    """The per-row statistic of every matrix of ``view``, as a view of a tensor shaped like
    ``row_statistic_shape`` whose last dim is ``width`` elements wide (``width`` > 1 when fp32
    values travel as 2-byte elements): matrix i is an ``m_i × width`` set of boxes beside matrix i's
    row blocks."""
    ndim = len(view.shape)
    shape = tuple(s if d <= view.row_dim else (width if d == ndim - 1 else 1) for d, s in enumerate(view.shape))

    def collapse(block: Region) -> Region:
        return tuple(r if d <= view.row_dim else ((0, width) if d == ndim - 1 else (0, 1)) for d, r in enumerate(block))

    return MatrixView(shape, view.row_dim,
                      tuple(RowSet(tuple(collapse(b) for b in rs.blocks), rs.row_dim) for rs in view.row_sets),
                      tuple((m, width) for m, _ in view.matrix_shapes))
