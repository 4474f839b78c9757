"""QK-clip in torchtitan (0.2.2 and 0.3.0): each attention layer's heads, and a forward hook that
records every head's largest pre-softmax logit into its DistMuon's ``qk_clip.max_logits``.

Attention layers are recognised by their attributes (no torchtitan import):

* llama3-style GQA: ``wq``/``wk`` (0.2.2's ``Attention``, 0.3.0's ``QKVLinear``) or the fused,
  per-KV-group interleaved ``wqkv`` (0.3.0's ``FusedQKVLinear``), with ``n_heads``/``n_kv_heads``;
* MLA (deepseek_v3, both versions): ``wq`` or ``wq_b``, and ``wkv_b``, with the head dims.

Models that normalise q and k per head after the projections (Qwen3's QK-norm) are refused: the
norm undoes any scaling of the weights, and their logits are bounded by it anyway.

The hook is a forward pre-hook on the layer's ``inner_attention`` (torchtitan's SDPA / flex
wrapper, the last module before the softmax), so it sees q and k exactly as attention does: after
RoPE, per local head. It computes the maximum of ``q·k·scale`` chunked over keys (memory
O(batch · heads · seq · chunk), never seq²), under the causal mask (SDPA) or the flex
``BlockMask``'s ``mask_mod`` (document masks), in float32. Under TP each rank records its own heads
(offset by its TP coordinate), under FSDP/DDP its own batch; the optimizer's step reduces them with
MAX over its ranks (data, tensor and context parallel ones; each pipeline stage has its own heads
and its own optimizer). It records only in forwards that build a graph (training, not evaluation
or the recomputation of activation checkpointing) and is not installed when QK-clip is off.

Context parallelism (0.2.2, SDPA): q and k arrive as DTensors sharded on the sequence over the CP
mesh, each rank holding a load-balanced part of it. The hook all-gathers the keys over the CP ranks
and masks by the global token positions the model part received (``positions``); 0.3.0's CP, whose
attention gathers the keys after this hook, is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import dist_muon as dm
from dist_muon import qk_clip as qk

BNLH, BLNH = "BNLH", "BLNH"  # q/k layout at inner_attention: 0.2.2 (B, heads, seq, d), 0.3.0 (B, seq, heads, d)
DEFAULT_CHUNK = 128


@dataclass(frozen=True, eq=False)
class Attention:
    """A recognised attention layer: its FQN in the part, the module, its heads, and the weight
    whose TP coordinate places this rank's query heads."""

    name: str
    module: nn.Module
    heads: qk.AttentionHeads
    query_weight: torch.Tensor


def attentions(part: nn.Module) -> list[Attention]:
    """Every attention layer of a model part whose heads QK-clip can scale, in module order."""
    found = []
    for prefix, module in part.named_modules():
        if not hasattr(module, "inner_attention"):
            continue
        name = dm.canonical_fqn(prefix)
        made = _mla(name, module) or _gqa(name, module)
        if made is None:
            raise ValueError(f"QK-clip: {name} ({type(module).__name__}) is an attention whose q/k projections are "
                             "not recognised (llama3-style wq/wk or fused wqkv, or deepseek_v3 MLA); register its "
                             "heads with dm.qk_clip and DistMuon(qk_clip_heads=...) yourself, or turn QK-clip off")
        found.append(made)
    return found


def _mla(name: str, m: nn.Module) -> Optional[Attention]:
    if not all(isinstance(getattr(m, a, None), int) for a in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")):
        return None
    wq = m.wq if isinstance(getattr(m, "wq", None), nn.Linear) else m.wq_b  # q_lora_rank 0, or > 0
    heads = qk.mla(name, wq.weight, m.wkv_b.weight, n_heads=m.n_heads, qk_nope_head_dim=m.qk_nope_head_dim,
                   qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, wq_bias=wq.bias,
                   wkv_b_bias=m.wkv_b.bias)
    return Attention(name, m, heads, wq.weight)


def _gqa(name: str, m: nn.Module) -> Optional[Attention]:
    if getattr(m, "q_norm", None) is not None or getattr(m, "k_norm", None) is not None:
        raise ValueError(f"QK-clip: {name} normalises q and k per head (QK-norm), which undoes any scaling of its "
                         "weights and already bounds its logits; turn QK-clip off for this model")
    proj = getattr(m, "qkv_linear", m)  # 0.3.0 keeps the projections in a submodule
    n_heads, n_kv = getattr(m, "n_heads", None), getattr(m, "n_kv_heads", None) or getattr(m, "n_heads", None)
    head_dim = getattr(proj, "head_dim", None) or getattr(m, "head_dim", None)
    if not all(isinstance(v, int) for v in (n_heads, n_kv, head_dim)):
        return None
    if isinstance(getattr(proj, "wqkv", None), nn.Linear):
        heads = qk.fused_qkv(name, proj.wqkv.weight, n_kv_heads=n_kv, heads_per_kv=n_heads // n_kv, head_dim=head_dim,
                             bias=proj.wqkv.bias)
        return Attention(name, m, heads, proj.wqkv.weight)
    if isinstance(getattr(proj, "wq", None), nn.Linear) and isinstance(getattr(proj, "wk", None), nn.Linear):
        heads = qk.mha(name, proj.wq.weight, proj.wk.weight, head_dim=head_dim, n_kv_heads=n_kv,
                       q_bias=proj.wq.bias, k_bias=proj.wk.bias)
        return Attention(name, m, heads, proj.wq.weight)
    return None


# ----------------------------------------------------------------------------- the max logit


def _mask_mod_chunk(mask_mod: Callable, batch: int, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """A flex ``mask_mod`` evaluated on a [batch, queries, keys] grid by broadcasting (head 0:
    torchtitan's masks do not depend on the head)."""
    b = torch.arange(batch, device=q_idx.device).view(-1, 1, 1)
    h = torch.zeros(1, 1, 1, dtype=torch.long, device=q_idx.device)
    return mask_mod(b, h, q_idx.view(1, -1, 1), kv_idx.view(1, 1, -1)).expand(batch, q_idx.numel(), kv_idx.numel())


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, *, causal: bool = True,
               mask_mod: Optional[Callable] = None, chunk: int = DEFAULT_CHUNK,
               q_positions: Optional[torch.Tensor] = None, k_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per query head, the largest ``q·k·scale`` over batch, queries and (unmasked) keys.

    ``q``: [B, Hq, Sq, d], ``k``: [B, Hkv, Sk, d]; query head ``h`` attends with key head
    ``h // (Hq / Hkv)`` (SDPA's ``enable_gqa``). ``mask_mod`` (a flex mask) replaces ``causal``.
    ``q_positions``/``k_positions`` (both or neither): each query's and key's position in the
    sequence, for the causal mask, when they are not in order (context parallelism's load-balanced
    shards); without them queries are the last Sq of Sk positions. Keys are taken ``chunk`` at a
    time; with ordered positions under a causal mask only the queries that see a chunk are
    multiplied with it. Computed in float32.
    """
    batch, n_heads, sq, d = q.shape
    n_kv, sk = k.shape[1], k.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not form groups over {n_kv} key heads")
    if (q_positions is None) != (k_positions is None):
        raise ValueError("max_logits: pass both q_positions and k_positions, or neither")
    if q_positions is not None and mask_mod is not None:
        raise ValueError("max_logits: positions apply to the causal mask, not to a flex mask_mod")
    qg = q.float().reshape(batch, n_kv, n_heads // n_kv, sq, d)
    kf = k.float()
    best = torch.full((n_kv, n_heads // n_kv), -math.inf, device=q.device)
    ordered = q_positions is None
    if ordered:
        positions = torch.arange(max(sq, sk), device=q.device)
        q_positions, k_positions = positions[:sq], positions[:sk]
    offset = sk - sq if ordered else 0  # ordered: queries are the last sq positions (sq == sk in training)
    for j0 in range(0, sk, chunk):
        j1 = min(sk, j0 + chunk)
        i0 = max(0, j0 - offset) if ordered and mask_mod is None and causal else 0
        if i0 >= sq:
            break
        logits = torch.einsum("bgrqd,bgkd->bgrqk", qg[:, :, :, i0:], kf[:, :, j0:j1]).mul_(scale)
        q_idx, kv_idx = q_positions[i0:], k_positions[j0:j1]
        if mask_mod is not None:
            keep = _mask_mod_chunk(mask_mod, batch, q_idx, kv_idx)[:, None, None]
        elif causal:
            keep = (q_idx.view(-1, 1) + offset >= kv_idx.view(1, -1))
        else:
            keep = None
        if keep is not None:
            logits.masked_fill_(~keep, -math.inf)
        torch.maximum(best, logits.amax(dim=(0, 3, 4)), out=best)
    return best.reshape(n_heads)


# ----------------------------------------------------------------------------- the hook


def _in_backward() -> bool:
    """An activation-checkpointing recompute runs the forward again inside backward: skip its work.

    Compiled blocks (torchtitan compiles each with ``fullgraph=True``) cannot ask autograd; there
    the hook is traced into the block's graph, and a recompute, if any, records the same maxima
    again, which leaves the running max as it was."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class SequencePositions:
    """The global sequence positions of this rank's tokens in the current forward, as torchtitan
    0.2.2 passes them to the model under context parallelism (``positions``, [B, S/cp], ordered
    by its load balancer); None without CP. A forward pre-hook on the model part sets them; the
    first attention layer gathers them over the CP ranks, the later ones reuse that."""

    def __init__(self):
        self.current: Optional[torch.Tensor] = None
        self._gathered: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def __call__(self, module, args, kwargs) -> None:
        self.current, self._gathered = kwargs.get("positions"), None

    def of_queries_and_keys(self, cp, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's query positions and those of the keys gathered over ``cp`` (in rank order)."""
        if self._gathered is None:
            from torch.distributed import _functional_collectives as funcol

            q_positions = self.current[0].to(device=device, dtype=torch.long)  # the same for every batch row
            k_positions = funcol.all_gather_tensor(q_positions, gather_dim=0, group=cp)
            self._gathered = q_positions, funcol.wait_tensor(k_positions)
        return self._gathered


class MaxLogitHook:
    """Forward pre-hook (with kwargs) on one layer's ``inner_attention``."""

    def __init__(self, attention: Attention, clip: qk.QKClip, layout: str, chunk: int,
                 positions: Optional[SequencePositions] = None):
        self.name, self.clip, self.layout, self.chunk = attention.name, clip, layout, chunk
        self.positions = positions
        self.n_heads = attention.heads.n_heads
        self.tp = _tp_coordinate(attention.query_weight)
        # flex attention without a BlockMask attends everywhere; SDPA's default is causal
        self.unmasked_is_causal = "flex" not in type(attention.module.inner_attention).__name__.lower()

    def __call__(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled() or _in_backward():
            return
        q, k = (args[0], args[1]) if len(args) >= 2 else _qk_from_kwargs(kwargs)
        mask = kwargs.get("block_mask", kwargs.get("attention_masks"))
        mask_mod = None
        if mask is not None:
            mask_mod = getattr(mask, "mask_mod", None)
            if mask_mod is None:
                raise ValueError(f"QK-clip: {self.name}'s attention masks are {type(mask).__name__}; the max-logit "
                                 "hook understands causal SDPA and flex BlockMasks (use attn type sdpa or flex)")
        head_dim = 1 if self.layout == BNLH else 2
        q, first, cp = self._local(q, head_dim)
        k, _, _ = self._local(k, head_dim, query=False)
        if self.layout == BLNH:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        lengths = getattr(mask, "seq_lengths", None)
        if lengths is not None and tuple(lengths) != (q.shape[2], k.shape[2]):
            # 0.3.0's context parallelism all-gathers the keys inside the attention, after this hook
            raise ValueError(f"QK-clip: {self.name}'s mask is for {tuple(lengths)} query/key positions but the "
                             f"attention receives {q.shape[2]}/{k.shape[2]} (context parallelism?); the max-logit "
                             "hook needs every key of a query's sequence on its rank")
        if self.positions is not None and self.positions.current is not None and cp is None:
            # 0.2.2's flex CP gathers the keys before this hook and shards the mask's queries
            raise ValueError(f"QK-clip: {self.name} runs with context parallelism and flex attention; QK-clip "
                             "supports context parallelism with SDPA (attn_type \"sdpa\") only")
        q_positions = k_positions = None
        if cp is not None:
            k, q_positions, k_positions = self._gather_keys(k, cp)
        scale = kwargs.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        causal = kwargs.get("is_causal", self.unmasked_is_causal)
        maxima = max_logits(q, k, scale, causal=causal, mask_mod=mask_mod, chunk=self.chunk,
                            q_positions=q_positions, k_positions=k_positions)
        self.clip.record(self.name, maxima, first_head=first)

    def _local(self, t: torch.Tensor, head_dim: int, query: bool = True):
        """The local tensor, (queries) the global index of its first head, and the context-parallel
        mesh its sequence is sharded over (None without CP)."""
        from torch.distributed.tensor import DTensor, Shard

        seq_dim = 3 - head_dim  # 2 for BNLH, 1 for BLNH
        cp = None
        if isinstance(t, DTensor):
            sharded = {p.dim for p in t.placements if isinstance(p, Shard)}
            if seq_dim in sharded:
                # 0.2.2's context parallelism (torch's _ContextParallel style): a 1-D CP mesh
                if t.device_mesh.ndim != 1 or len(t.placements) != 1:
                    raise ValueError(f"QK-clip: {self.name}'s q/k are sharded on the sequence over a "
                                     f"{t.device_mesh.ndim}-D mesh; context parallelism needs a 1-D CP mesh")
                cp = t.device_mesh
            elif head_dim in sharded:
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
                return t.to_local(), int(offset[head_dim]), None
            t = t.to_local()
        local_heads = t.shape[head_dim]
        if not query or local_heads == self.n_heads:
            return t, 0, cp
        if self.tp is None:
            raise ValueError(f"QK-clip: {self.name} sees {local_heads} of {self.n_heads} query heads but its weights "
                             "have no 'tp' mesh dim to place them")
        return t, self.tp * local_heads, cp

    def _gather_keys(self, k: torch.Tensor, cp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every key of the sequence (all-gathered over the CP mesh, in rank order), the global
        positions of this rank's queries and of the gathered keys. Functional collectives: they
        trace into compiled blocks."""
        from torch.distributed import _functional_collectives as funcol

        if self.positions is None or self.positions.current is None:
            raise ValueError(f"QK-clip: {self.name} runs with context parallelism but the model received no "
                             "'positions' (torchtitan 0.2.2 passes them under CP); install the hooks with "
                             "install(..., part=model)")
        q_positions, k_positions = self.positions.of_queries_and_keys(cp, k.device)
        if q_positions.numel() != k.shape[2]:
            raise ValueError(f"QK-clip: {self.name} holds {k.shape[2]} positions of the sequence but the model "
                             f"received {q_positions.numel()} positions")
        keys = funcol.all_gather_tensor(k.detach().contiguous(), gather_dim=2, group=cp)
        return funcol.wait_tensor(keys), q_positions, k_positions


def _qk_from_kwargs(kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    for names in (("q", "k"), ("q_BLNH", "k_BLNH"), ("query", "key")):
        if all(n in kwargs for n in names):
            return kwargs[names[0]], kwargs[names[1]]
    raise ValueError(f"QK-clip: cannot find q and k among the attention's arguments {sorted(kwargs)}")


def _tp_coordinate(weight: torch.Tensor) -> Optional[int]:
    """This rank's coordinate on the weight's 'tp' mesh dim (None without one)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):
        return None
    names = weight.device_mesh.mesh_dim_names or ()
    return weight.device_mesh.get_local_rank(names.index("tp")) if "tp" in names else None


def install(found: list[Attention], opt: dm.DistMuon, layout: str, chunk: int = DEFAULT_CHUNK,
            part: Optional[nn.Module] = None) -> list:
    """Register the hooks of ``found`` writing into ``opt``'s maxima; returns the handles. ``part``:
    the model (part) they are in, whose ``positions`` argument places this rank's tokens under
    context parallelism (torchtitan 0.2.2)."""
    if opt.qk_clip is None:
        raise ValueError("QK-clip hooks need a DistMuon built with qk_clip_threshold and qk_clip_heads")
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"QK-clip: the key chunk must be a positive integer, got {chunk!r}")
    handles, positions = [], None
    if part is not None:
        positions = SequencePositions()
        handles.append(part.register_forward_pre_hook(positions, with_kwargs=True))
    for attention in found:
        inner = attention.module.inner_attention
        if "varlen" in type(inner).__name__.lower():
            raise ValueError(f"QK-clip: {attention.name} uses varlen attention; the max-logit hook understands SDPA "
                             "and flex attention")
        handles.append(inner.register_forward_pre_hook(MaxLogitHook(attention, opt.qk_clip, layout, chunk, positions),
                                                       with_kwargs=True))
    return handles
