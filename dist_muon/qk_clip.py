"""QK-clip (MuonClip, Kimi K2): bounded attention logits, applied to sharded weights after a step.

For every attention head ``h`` with ``S_h``, the largest pre-softmax logit ``q·k·scale`` seen in
the step's forward on any rank, and a threshold ``τ``: ``γ_h = min(1, τ / S_h)``; the head's query
and key weights are rescaled so that its logits (same inputs) are multiplied by exactly ``γ_h``:

* a key head shared by a group of query heads (GQA; MHA is groups of one) is scaled by
  ``k = (min over its group of γ)^(1−α)``, and each query head of the group by ``γ_h / k``.
  The product is ``γ_h`` for every head, so each head's largest logit becomes ``min(S_h, τ)``,
  exactly, as if it had its own key; a head of the group that needs no clip (``γ_h = 1``) is left
  with its logits unchanged (its query grows by ``1/k`` to undo the shared key's shrinking).
  With groups of one this is Kimi's ``W_q ← γ^α W_q``, ``W_k ← γ^(1−α) W_k``;
* MLA (DeepSeek-V3): the head-specific parts ``q_C`` (query rows) and ``k_C`` (``wkv_b``'s key
  rows) as above (``γ^α``, ``γ^(1−α)``; ``α = ½``: ``√γ`` each), the head-specific rotary query
  ``q_R`` by ``γ``, the rotary key ``k_R`` shared by all heads untouched.

Which rows are which is declared per attention layer (``AttentionHeads``; builders for separate
``wq``/``wk``, fused QKV weights, interleaved or not, and MLA). Rows are global indices along dim
0 of a parameter; each rank scales only the rows it holds, from the parameter's layout (plain,
FSDP shards cutting through heads, TP shards holding whole heads, HSDP replicas): no weight is
gathered. Everything runs on the device: per step a handful of ops turn the maxima into one
factor per (head, role), one ``index_select`` spreads them over every local row of every
registered parameter, and one ``_foreach_mul_`` applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from .comm import CommGroup, local_tensor
from .layout import layout_of


@dataclass(frozen=True, eq=False)
class Rows:
    """Rows ``[start, stop)`` along dim 0 of ``param``, in global indices (whatever its sharding)."""

    param: torch.Tensor
    start: int
    stop: int


Head = tuple[Rows, ...]  # the rows of one head (usually one block)


@dataclass(frozen=True, eq=False)
class AttentionHeads:
    """One attention layer: which parameter rows form each head's query and key.

    ``q[h]``: rows of query head ``h`` scaled by the query factor; ``k[g]``: rows of key head ``g``;
    ``kv_head[h]``: the key head query head ``h`` attends with; ``q_rope[h]`` (MLA only): rows of
    query head ``h`` whose key part is shared by all heads, scaled by ``γ_h``. Query heads are
    numbered as the attention numbers them: the maxima of this layer are ``len(q)`` values in
    this order.
    """

    name: str
    q: tuple[Head, ...]
    k: tuple[Head, ...]
    kv_head: tuple[int, ...]
    q_rope: tuple[Head, ...] = ()

    def __post_init__(self):
        if not self.q or not self.k:
            raise ValueError(f"{self.name}: an attention needs at least one query and one key head")
        if len(self.kv_head) != len(self.q):
            raise ValueError(f"{self.name}: kv_head has {len(self.kv_head)} entries for {len(self.q)} query heads")
        if any(not 0 <= g < len(self.k) for g in self.kv_head):
            raise ValueError(f"{self.name}: kv_head {self.kv_head} names a key head outside 0..{len(self.k) - 1}")
        if self.q_rope and len(self.q_rope) != len(self.q):
            raise ValueError(f"{self.name}: q_rope has {len(self.q_rope)} heads for {len(self.q)} query heads")

    @property
    def n_heads(self) -> int:
        return len(self.q)

    @property
    def n_kv_heads(self) -> int:
        return len(self.k)


def _blocks(param: torch.Tensor, start: int, size: int, count: int, stride: int) -> tuple[Head, ...]:
    return tuple((Rows(param, start + i * stride, start + i * stride + size),) for i in range(count))


def _positive(name: str, **values: Optional[int]) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")


def _check_rows(name: str, what: str, param: torch.Tensor, expected: int) -> None:
    if param.ndim < 1 or param.shape[0] != expected:
        raise ValueError(f"{name}: {what} has shape {tuple(param.shape)} but the heads need {expected} rows in dim 0")


def with_bias(heads: AttentionHeads, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> AttentionHeads:
    """``heads`` with each head's rows of ``weight`` joined by the same rows of its ``bias``: a
    projection ``W x + b`` scales with both (None: no bias, ``heads`` as they are)."""
    if bias is None:
        return heads
    if bias.ndim != 1:
        raise ValueError(f"{heads.name}: a bias must be 1-D, got shape {tuple(bias.shape)}")
    _check_rows(heads.name, "the bias", bias, weight.shape[0])

    def join(head: Head) -> Head:
        return head + tuple(Rows(bias, r.start, r.stop) for r in head if r.param is weight)

    return replace(heads, q=tuple(map(join, heads.q)), k=tuple(map(join, heads.k)),
                   q_rope=tuple(map(join, heads.q_rope)))


def mha(name: str, wq: torch.Tensor, wk: torch.Tensor, *, head_dim: int, n_kv_heads: Optional[int] = None,
        q_bias: Optional[torch.Tensor] = None, k_bias: Optional[torch.Tensor] = None) -> AttentionHeads:
    """Separate query and key projections (``[n_heads·head_dim, dim]``, ``[n_kv_heads·head_dim, dim]``,
    optional biases); query head ``h`` uses key head ``h // (n_heads / n_kv_heads)`` (GQA; MHA
    without ``n_kv_heads``)."""
    _positive(name, head_dim=head_dim)
    if wq.shape[0] % head_dim:
        raise ValueError(f"{name}: wq has {wq.shape[0]} rows, not a whole number of heads of {head_dim}")
    n_heads = wq.shape[0] // head_dim
    n_kv = n_heads if n_kv_heads is None else n_kv_heads
    _positive(name, n_kv_heads=n_kv)
    if n_heads % n_kv:
        raise ValueError(f"{name}: {n_heads} query heads do not form groups of {n_kv} key heads")
    _check_rows(name, "wk", wk, n_kv * head_dim)
    group = n_heads // n_kv
    heads = AttentionHeads(name, _blocks(wq, 0, head_dim, n_heads, head_dim), _blocks(wk, 0, head_dim, n_kv, head_dim),
                           tuple(h // group for h in range(n_heads)))
    return with_bias(with_bias(heads, wq, q_bias), wk, k_bias)


def fused_qkv(name: str, wqkv: torch.Tensor, *, n_kv_heads: int, heads_per_kv: int, head_dim: int,
              bias: Optional[torch.Tensor] = None) -> AttentionHeads:
    """A fused QKV weight interleaved per key head, rows ``(n_kv_heads, heads_per_kv + 2, head_dim)``
    (torchtitan 0.3.0's ``FusedQKVLinear``): per group its query heads, then its key, then its value."""
    _positive(name, n_kv_heads=n_kv_heads, heads_per_kv=heads_per_kv, head_dim=head_dim)
    period = (heads_per_kv + 2) * head_dim
    _check_rows(name, "wqkv", wqkv, n_kv_heads * period)
    q = tuple((Rows(wqkv, g * period + i * head_dim, g * period + (i + 1) * head_dim),)
              for g in range(n_kv_heads) for i in range(heads_per_kv))
    k = _blocks(wqkv, heads_per_kv * head_dim, head_dim, n_kv_heads, period)
    heads = AttentionHeads(name, q, k, tuple(h // heads_per_kv for h in range(n_kv_heads * heads_per_kv)))
    return with_bias(heads, wqkv, bias)


def packed_qkv(name: str, wqkv: torch.Tensor, *, n_heads: int, n_kv_heads: int, head_dim: int,
               bias: Optional[torch.Tensor] = None) -> AttentionHeads:
    """A fused QKV weight stacked ``[Q; K; V]`` (all query heads, then all keys, then all values)."""
    _positive(name, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    if n_heads % n_kv_heads:
        raise ValueError(f"{name}: {n_heads} query heads do not form groups of {n_kv_heads} key heads")
    _check_rows(name, "wqkv", wqkv, (n_heads + 2 * n_kv_heads) * head_dim)
    group = n_heads // n_kv_heads
    heads = AttentionHeads(name, _blocks(wqkv, 0, head_dim, n_heads, head_dim),
                           _blocks(wqkv, n_heads * head_dim, head_dim, n_kv_heads, head_dim),
                           tuple(h // group for h in range(n_heads)))
    return with_bias(heads, wqkv, bias)


def mla(name: str, wq: torch.Tensor, wkv_b: torch.Tensor, *, n_heads: int, qk_nope_head_dim: int,
        qk_rope_head_dim: int, v_head_dim: int, wq_bias: Optional[torch.Tensor] = None,
        wkv_b_bias: Optional[torch.Tensor] = None) -> AttentionHeads:
    """Multi-head latent attention (DeepSeek-V3): ``wq`` (or ``wq_b``) rows per head
    ``[q_C (qk_nope_head_dim); q_R (qk_rope_head_dim)]``, ``wkv_b`` rows per head
    ``[k_C (qk_nope_head_dim); v (v_head_dim)]``. The shared rotary key (in ``wkv_a``) is not scaled."""
    _positive(name, n_heads=n_heads, qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
              v_head_dim=v_head_dim)
    q_dim, kv_dim = qk_nope_head_dim + qk_rope_head_dim, qk_nope_head_dim + v_head_dim
    _check_rows(name, "wq", wq, n_heads * q_dim)
    _check_rows(name, "wkv_b", wkv_b, n_heads * kv_dim)
    heads = AttentionHeads(name, _blocks(wq, 0, qk_nope_head_dim, n_heads, q_dim),
                           _blocks(wkv_b, 0, qk_nope_head_dim, n_heads, kv_dim), tuple(range(n_heads)),
                           q_rope=_blocks(wq, qk_nope_head_dim, qk_rope_head_dim, n_heads, q_dim))
    return with_bias(with_bias(heads, wq, wq_bias), wkv_b, wkv_b_bias)


# ----------------------------------------------------------------------------- settings


def check_settings(threshold: Optional[float], alpha: float, heads: Sequence[AttentionHeads],
                   optional: bool = False) -> None:
    """Raises ValueError naming the option and the fix. ``optional``: heads are registered and the
    threshold may be None (clipping turned off after construction)."""
    if threshold is not None:
        ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
        if not ok or threshold <= 0:
            raise ValueError(f"qk_clip_threshold must be a positive number (τ, e.g. 100) or None (off), got {threshold!r}")
        if not heads:
            raise ValueError("qk_clip_threshold is set but no attention heads are registered: pass qk_clip_heads="
                             "[dm.qk_clip.mha(...), ...] (which rows of which weights form each head's q and k)")
    elif heads and not optional:
        raise ValueError("qk_clip_heads were given but qk_clip_threshold is None: set the threshold τ (e.g. 100) "
                         "to clip, or leave the heads out")
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.0 <= alpha <= 1.0
    if not ok:
        raise ValueError(f"qk_clip_alpha must be a number in [0, 1] (the query's share of the scaling), got {alpha!r}")


# ----------------------------------------------------------------------------- the head -> row map

# Factor vector: [query factor per head (H) | γ per head (H), for q_R | key factor per key head (G) | 1]
_Q, _Q_ROPE, _K = "q", "q_rope", "k"


@dataclass(frozen=True)
class RowMap:
    """Per registered parameter, the factor index of each global row along dim 0 (``ones`` for rows
    of no head), and the key head of every query head; the same on every rank."""

    n_heads: int
    n_kv_heads: int
    kv_head: tuple[int, ...]  # global key-head index of every global query head
    slices: tuple[tuple[str, int, int], ...]  # (attention name, first head, end) in the maxima vector
    params: tuple[torch.Tensor, ...]
    names: tuple[str, ...]
    factor_index: tuple[np.ndarray, ...]  # per param: int64 [rows]
    fingerprint: str

    @property
    def ones(self) -> int:
        return 2 * self.n_heads + self.n_kv_heads


def build_row_map(heads: Sequence[AttentionHeads], names: Mapping[int, str]) -> RowMap:
    """``names``: id(param) -> name, for every parameter of the optimizer (others are refused)."""
    seen_names = set()
    for att in heads:
        if not isinstance(att, AttentionHeads):
            raise TypeError(f"qk_clip_heads must be AttentionHeads (dm.qk_clip.mha(...) etc.), got {type(att).__name__}")
        if att.name in seen_names:
            raise ValueError(f"qk_clip_heads: two attentions are named {att.name!r}; give each layer its own name")
        seen_names.add(att.name)
    n_heads = sum(a.n_heads for a in heads)
    n_kv = sum(a.n_kv_heads for a in heads)
    ones = 2 * n_heads + n_kv
    params: dict[int, torch.Tensor] = {}
    index: dict[int, np.ndarray] = {}
    owner: dict[int, list] = {}
    kv_head, slices, record = [], [], []
    h0 = g0 = 0

    def assign(att: AttentionHeads, role: str, head: int, rows: Rows, factor: int) -> None:
        p = rows.param
        if id(p) not in names:
            raise ValueError(f"{att.name}: a {role} row block names a parameter that is not in this optimizer "
                             f"(shape {tuple(p.shape)}); register the model's own parameters, as passed to DistMuon")
        name = names[id(p)]
        if p.ndim < 1 or not (isinstance(rows.start, int) and isinstance(rows.stop, int)) \
                or not 0 <= rows.start < rows.stop <= p.shape[0]:
            raise ValueError(f"{att.name}: {role} head {head} rows [{rows.start}, {rows.stop}) are not inside dim 0 of "
                             f"{name} (shape {tuple(p.shape)})")
        if id(p) not in index:
            params[id(p)] = p
            index[id(p)] = np.full(p.shape[0], ones, dtype=np.int64)
            owner[id(p)] = [None] * p.shape[0]
        taken = next((o for o in owner[id(p)][rows.start:rows.stop] if o is not None), None)
        if taken is not None:
            raise ValueError(f"{att.name}: {role} head {head} rows [{rows.start}, {rows.stop}) of {name} overlap the "
                             f"rows of {taken}; every row belongs to at most one head and role")
        index[id(p)][rows.start:rows.stop] = factor
        owner[id(p)][rows.start:rows.stop] = [f"{att.name} {role} head {head}"] * (rows.stop - rows.start)
        record.append((name, rows.start, rows.stop, role, factor))

    for att in heads:
        for h, head in enumerate(att.q):
            for rows in head:
                assign(att, _Q, h, rows, h0 + h)
        for h, head in enumerate(att.q_rope):
            for rows in head:
                assign(att, _Q_ROPE, h, rows, n_heads + h0 + h)
        for g, head in enumerate(att.k):
            for rows in head:
                assign(att, _K, g, rows, 2 * n_heads + g0 + g)
        kv_head.extend(g0 + g for g in att.kv_head)
        slices.append((att.name, h0, h0 + att.n_heads))
        h0, g0 = h0 + att.n_heads, g0 + att.n_kv_heads
    order = list(index)
    return RowMap(n_heads, n_kv, tuple(kv_head), tuple(slices), tuple(params[i] for i in order),
                  tuple(names[i] for i in order), tuple(index[i] for i in order),
                  repr((tuple(kv_head), tuple(slices), tuple(record))))


def local_factor_index(row_map: RowMap, comm: CommGroup) -> list[tuple[int, np.ndarray]]:
    """(parameter position, factor index of each local row along dim 0) of the registered
    parameters this rank holds rows of, from each parameter's layout."""
    out = []
    for i, (p, index) in enumerate(zip(row_map.params, row_map.factor_index)):
        runs = layout_of(p, comm.ranks).runs[comm.rank]
        if runs is None or not runs[0]:
            continue
        local = np.empty(sum(r.length for r in runs[0]), dtype=np.int64)
        for r in runs[0]:
            local[r.local:r.local + r.length] = index[r.start:r.start + r.length]
        if local_tensor(p).shape[0] != local.size:
            raise ValueError(f"{row_map.names[i]}: local shard has {local_tensor(p).shape[0]} rows but its layout says "
                             f"{local.size}; QK-clip cannot map its rows to heads")
        if (local != row_map.ones).any():
            out.append((i, local))
    return out


# ----------------------------------------------------------------------------- maxima across ranks

_LOW_BITS = 0x7FFFFFFFFFFFFFFF


def encode_maxima(maxima: torch.Tensor) -> torch.Tensor:
    """float -> int64 with the same order (an integer MAX all-reduce is then a float MAX):
    an fp64's bits, with the magnitude bits of negative numbers flipped."""
    bits = maxima.to(torch.float64).view(torch.int64)
    return torch.where(bits < 0, bits ^ _LOW_BITS, bits)


def decode_maxima(encoded: torch.Tensor) -> torch.Tensor:
    return torch.where(encoded < 0, encoded ^ _LOW_BITS, encoded).view(torch.float64).to(torch.float32)


# ----------------------------------------------------------------------------- one rank's clip


@dataclass(frozen=True)
class ClipResult:
    """Device scalars of one clip (read them when logging: reading syncs)."""

    max_logit: torch.Tensor  # the largest S_h over this optimizer's heads
    heads_clipped: torch.Tensor  # how many heads had S_h > τ


class QKClip:
    """The registered heads of one optimizer, the maxima buffer the forward fills, and this rank's
    per-row scale vector (built once: views into it are fixed).

    ``max_logits`` ([n_heads] float32, on the parameters' device) is ``-inf`` after every step; fill
    it before the next one with this rank's per-head maxima (``record`` keeps the running maximum,
    e.g. over micro-batches). The step reduces it with MAX over the optimizer's ranks.
    """

    def __init__(self, heads: Sequence[AttentionHeads], names: Mapping[int, str], comm: CommGroup, device):
        self.heads = tuple(heads)
        self.row_map = build_row_map(self.heads, names)
        self.device = device
        self._slices = {name: slice(a, b) for name, a, b in self.row_map.slices}
        self.max_logits = torch.full((self.row_map.n_heads,), -math.inf, dtype=torch.float32, device=device)
        self.last_maxima: Optional[torch.Tensor] = None  # the last step's maxima, over the optimizer's ranks
        self._kv_head = torch.tensor(self.row_map.kv_head, dtype=torch.long, device=device)
        self._ones_kv = torch.ones(self.row_map.n_kv_heads, dtype=torch.float32, device=device)
        self._one = torch.ones(1, dtype=torch.float32, device=device)
        local = local_factor_index(self.row_map, comm)
        self._local_params = [i for i, _ in local]
        self._index = torch.tensor(np.concatenate([idx for _, idx in local]) if local else np.zeros(0, np.int64),
                                   dtype=torch.long, device=device)
        self._row_scale = torch.empty(self._index.numel(), dtype=torch.float32, device=device)
        self._scale_views = []
        offset = 0
        for i, idx in local:
            p = local_tensor(self.row_map.params[i])
            self._scale_views.append(self._row_scale[offset:offset + idx.size].view(-1, *([1] * (p.ndim - 1))))
            offset += idx.size

    @property
    def n_heads(self) -> int:
        return self.row_map.n_heads

    def slice(self, name: str) -> slice:
        """Where attention ``name``'s heads are in ``max_logits``."""
        try:
            return self._slices[name]
        except KeyError:
            raise KeyError(f"no attention named {name!r} is registered for QK-clip; known: {list(self._slices)[:4]}"
                           f"{' …' if len(self._slices) > 4 else ''}") from None

    @torch.no_grad()
    def record(self, name: str, maxima: torch.Tensor, first_head: int = 0) -> None:
        """Keep the running max of attention ``name``'s heads ``first_head ..`` (a TP rank's heads)."""
        s = self.slice(name)
        if first_head < 0 or first_head + maxima.numel() > s.stop - s.start:
            raise ValueError(f"{name}: {maxima.numel()} maxima from head {first_head} exceed its {s.stop - s.start} heads")
        view = self.max_logits[s.start + first_head:s.start + first_head + maxima.numel()]
        torch.maximum(view, maxima.detach().reshape(-1).to(view.dtype), out=view)

    def reset(self) -> None:
        self.max_logits.fill_(-math.inf)

    def factors(self, maxima: torch.Tensor, threshold: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The factor vector ``[query | γ (q_R) | key | 1]`` and the clipped-head mask, on the device."""
        clipped = maxima > threshold
        gamma = torch.where(clipped, threshold / maxima, 1.0)
        group_min = self._ones_kv.scatter_reduce(0, self._kv_head, gamma, "amin")
        key = group_min.pow(1.0 - alpha)
        query = gamma / key.index_select(0, self._kv_head)
        return torch.cat([query, gamma, key, self._one]), clipped

    @torch.no_grad()
    def apply(self, maxima: torch.Tensor, threshold: float, alpha: float) -> ClipResult:
        """Scale this rank's rows by the factors of ``maxima`` (the heads' global maxima)."""
        self.last_maxima = maxima
        factors, clipped = self.factors(maxima, threshold, alpha)
        if self._scale_views:
            torch.index_select(factors, 0, self._index, out=self._row_scale)
            torch._foreach_mul_([local_tensor(self.row_map.params[i]) for i in self._local_params], self._scale_views)
        return ClipResult(maxima.max(), clipped.sum())
