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
