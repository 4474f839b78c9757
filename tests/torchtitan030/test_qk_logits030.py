"""torchtitan 0.3.0: QK-clip's max-logit hook on our debug configs' models (llama3: fused, interleaved
wqkv with GQA; deepseek_v3: MLA), built as torchtitan's Trainer builds them, fed like its
``post_dataloading_process`` feeds them (packed documents: flex attention with a causal, per-document
BlockMask; full_dtensor inputs), under FSDP 2 and TP 2. After one DistMuonContainer step the
maxima (reduced over the ranks) equal an explicit q·kᵀ computed whole, on one process and the full
batch, from the q and k attention receives, masked by causality and document boundaries derived
from the positions here.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness import DistributedPool
from test_layouts import LLAMA, MOE, _build, _full

SEQ, BATCH = 16, 4
CASES = {"fsdp2": dict(data_parallel_shard_degree=2),
         "tp2": dict(data_parallel_shard_degree=1, tensor_parallel_degree=2)}


@pytest.fixture(scope="module")
def pool2():
    pool = DistributedPool(2)
    yield pool
    pool.close()


def _config(name: str, parallelism: dict):
    from dist_muon.integrations.torchtitan import config_registry
    from torchtitan.config import ParallelismConfig

    c = getattr(config_registry, name)()
    c.model_spec.model.layers = c.model_spec.model.layers[:2]
    c.parallelism = ParallelismConfig(spmd_backend="full_dtensor", **parallelism)
    c.training.seq_len = SEQ
    return c


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and positions of packed documents (positions restart at 0 at each document)."""
    tokens = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    lengths = [[16], [5, 11], [3, 3, 10], [9, 7]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return tokens, positions


def _scale_up(parts) -> None:
    """q/k weights enlarged (same on every rank) so the logits are O(1)."""
    with torch.no_grad():
        for part in parts:
            for name, p in part.named_parameters():
                if any(k in name for k in ("wqkv", "wq.", "wq_b", "wkv_a", "wkv_b")):
                    p.mul_(30)


def hook_maxima(config_name: str, case: str) -> list[float]:
    from launch import cpu_shims_030

    if cpu_shims_030.cpu_shims_needed():
        cpu_shims_030.activate()
    import torch.distributed as dist
    from dist_muon import canonical_fqn
    from dist_muon.integrations.torchtitan import DistMuonContainer
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import full_dtensor
    from torchtitan.distributed import utils as dist_utils

    config = _config(config_name, CASES[case])
    parallel_dims = ParallelDims.from_config(config.parallelism, dist.get_world_size())
    dist_utils.set_spmd_backend("full_dtensor")
    (part,) = _build(config, parallel_dims)
    _scale_up([part])
    # Everything routed to AdamW: the step only has to reduce the maxima (MLA's wkv_b alone would
    # cost ~23 GFLOP of Newton–Schulz); QK-clip scales any parameter of the optimizer.
    opts = DistMuonContainer.Config(lr=0.0, adamw_lr=0.0, qk_clip_threshold=1e9, qk_clip_chunk=5,
                                    log_routing=False, rules=[{"pattern": ".", "algorithm": "adamw"}]
                                    ).build(model_parts=[part])
    tokens, positions = _batch()
    if case == "fsdp2":  # data parallel: each rank its half of the batch
        rank = dist.get_rank()
        tokens, positions = tokens.chunk(2)[rank], positions.chunk(2)[rank]
    masks = part.get_attention_masks(positions=positions)
    inputs, labels, extra = full_dtensor.parallelize_inputs(
        parallel_dims, tokens, tokens, {"positions": positions, "attention_masks": masks})
    out = part(inputs, **extra)
    out = out.full_tensor() if hasattr(out, "full_tensor") else out
    (out.float() ** 2).mean().backward()
    opts.step()
    (opt,) = opts.optimizers
    return opt.qk_clip.last_maxima.tolist(), {canonical_fqn(n): _full(p) for n, p in part.named_parameters()}


def explicit_maxima(config_name: str, weights: dict) -> torch.Tensor:
    """On one process, the full batch, the distributed model's ``weights``."""
    from launch import cpu_shims_030

    if cpu_shims_030.cpu_shims_needed():
        cpu_shims_030.activate()
    from dist_muon import canonical_fqn

    config = _config(config_name, {})
    model = config.model_spec.model.build()
    with torch.no_grad():
        model.init_weights(buffer_device=None)  # buffers (RoPE)
        for n, p in model.named_parameters():
            p.copy_(weights[canonical_fqn(n)])
    seen = []
    for layer in model.layers.values():
        layer.attention.inner_attention.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args[0], args[1], kwargs.get("scale"))), with_kwargs=True)
    tokens, positions = _batch()
    with torch.no_grad():
        model(tokens, positions=positions, attention_masks=model.get_attention_masks(positions=positions))
    docs = torch.cumsum(positions == 0, dim=1)
    i, j = torch.arange(SEQ).view(-1, 1), torch.arange(SEQ).view(1, -1)
    allowed = (j <= i) & (docs[:, :, None] == docs[:, None, :])  # [B, q, k]
    out = []
    for q, k, scale in seen:  # (B, L, N, H)
        q, k = q.transpose(1, 2).double(), k.transpose(1, 2).double()
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        out.append(s.masked_fill(~allowed[:, None], -math.inf).amax(dim=(0, 2, 3)))
    return torch.cat(out).float()


@pytest.mark.parametrize("config_name", [LLAMA, MOE])
@pytest.mark.parametrize("case", list(CASES))
def test_hook_maxima_equal_explicit_qk(pool2, config_name, case):
    if config_name == MOE:  # a full_dtensor MoE needs ranks of its own (see test_layouts.FRESH)
        fresh = DistributedPool(2)
        try:
            results = fresh.run(hook_maxima, config_name, case)
        finally:
            fresh.close()
    else:
        results = pool2.run(hook_maxima, config_name, case)
    for got, weights in results:
        torch.testing.assert_close(torch.tensor(got), explicit_maxima(config_name, weights), rtol=1e-5, atol=1e-6)


def test_fused_wqkv_heads_are_the_interleaved_rows():
    """The registered rows of 0.3.0's llama3 fused wqkv: per KV group, its query heads then its key."""
    from dist_muon.integrations.torchtitan import qk_logits

    model = _config(LLAMA, {}).model_spec.model.build()
    (first, *_) = qk_logits.attentions(model)
    heads = first.heads
    att = model.layers["0"].attention if hasattr(model.layers, "keys") else model.layers[0].attention
    hd, hpk = att.qkv_linear.head_dim, att.qkv_linear.heads_per_kv
    period = (hpk + 2) * hd
    assert [(r.start, r.stop) for (r,) in heads.k] == [(g * period + hpk * hd, g * period + (hpk + 1) * hd)
                                                       for g in range(heads.n_kv_heads)]
    assert heads.kv_head == tuple(h // hpk for h in range(heads.n_heads))
