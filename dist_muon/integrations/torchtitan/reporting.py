"""What the trainers of both torchtitan versions log about DistMuon each logged step."""

from __future__ import annotations


def group_lrs(optimizers) -> str:
    parts = []
    for i, opt in enumerate(optimizers):
        prefix = "" if len(optimizers) == 1 else f"{i}."
        parts += [f"{prefix}{g.get('algorithm', 'group')}={g['lr']:.6g}" for g in opt.param_groups]
    return " ".join(parts)


def step_stats(optimizers) -> str:
    """This rank's last DistMuon step: NS time and FLOPs, communication time and volume."""
    stats = [s for opt in optimizers if (s := getattr(opt, "last_step_stats", None)) is not None]
    if not stats:
        return ""
    total = {key: sum(getattr(s, key) for s in stats)
             for key in ("matrices_owned", "ns_flops", "ns_seconds", "bytes_sent", "comm_seconds")}
    return (
        f"matrices owned {total['matrices_owned']}, NS {total['ns_flops'] / 1e9:.2f} GFLOP in "
        f"{total['ns_seconds']:.3f}s, comm {total['bytes_sent'] / 2**20:.1f} MiB out in {total['comm_seconds']:.3f}s"
    )


def qk_clip_summary(optimizers, parallel_dims, enabled: bool) -> str:
    """QK-clip over the whole model: the largest max logit and how many heads were clipped in the last
    step. Each pipeline stage's DistMuon knows only its own heads (already reduced over its ranks), so
    with pipeline parallelism the stages are combined over the 'pp' mesh: collective, on every rank
    of a logged step (``enabled``, the configured τ being set, is the same on every rank; a stage
    without attention layers joins with nothing). "" when QK-clip is off."""
    import torch

    if not enabled:
        return ""
    stats = [s for opt in optimizers if (s := getattr(opt, "last_step_stats", None)) is not None
             and s.qk_max_logit is not None]
    device = next((s.qk_max_logit.device for s in stats), torch.device("cpu"))
    largest = torch.stack([s.qk_max_logit.float() for s in stats]).max() if stats else torch.tensor(-float("inf"))
    clipped = sum((s.qk_heads_clipped for s in stats if s.qk_heads_clipped is not None),
                  torch.zeros((), dtype=torch.int64, device=device))
    pp = _pp(parallel_dims)
    if pp is not None:
        import torch.distributed as dist

        largest, clipped = largest.to(device).reshape(1), clipped.to(device).reshape(1)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=pp.get_group())
        dist.all_reduce(clipped, op=dist.ReduceOp.SUM, group=pp.get_group())
    return f"QK-clip: max logit {float(largest):.6g}, heads clipped {int(clipped)}"


def _pp(parallel_dims):
    if parallel_dims is None or not getattr(parallel_dims, "pp_enabled", False):
        return None
    return parallel_dims.get_optional_mesh("pp")
