"""How long building a plan takes at scale (no processes needed: the plan is a pure function).

    python -m benchmarks.plan_scale --world-size 64

A DeepSeek-V3-sized MoE (58 MoE layers × 256 experts × w1/w2/w3, plus wq/wkv/wo per layer:
44,718 matrices), every parameter FSDP-sharded on dim 0 of a 1-D mesh of ``--world-size`` ranks.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.distributed.tensor import Shard

from dist_muon import plan as plan_mod
from dist_muon.layout import dtensor_layout
from dist_muon.numerics import NSKey, resolve_schedule
from dist_muon.schedule import local_schedule
from dist_muon.views import build_view


class RankGrid:
    """What the planner reads of a DeviceMesh (its rank grid), without starting W processes."""

    def __init__(self, world: int):
        self.mesh = torch.arange(world)
        self.shape = (world,)
        self.mesh_dim_names = ("dp_shard",)


def deepseek_v3_specs(world: int, layers: int = 58, experts: int = 256) -> list:
    grid = RankGrid(world)
    schedule = resolve_schedule("polar_express", 5)
    key = NSKey(torch.bfloat16, schedule)
    shapes = [("w1", (experts, 2048, 7168)), ("w3", (experts, 2048, 7168)), ("w2", (experts, 7168, 2048)),
              ("wq", (24576, 7168)), ("wkv", (4096, 7168)), ("wo", (7168, 16384))]
    return [
        plan_mod.MatrixSpec(f"layers.{i}.{name}", build_view(shape),
                            dtensor_layout(shape, grid, [Shard(0)], range(world)), key, "original", 0)
        for i in range(layers) for name, shape in shapes
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=64)
    ap.add_argument("--bucket-gib", type=float, default=1.0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    specs = deepseek_v3_specs(args.world_size)
    t1 = time.perf_counter()
    plan = plan_mod.build_plan(specs, args.world_size, bucket_bytes=int(args.bucket_gib * 2**30))
    t2 = time.perf_counter()
    local_schedule(plan, 0)
    t3 = time.perf_counter()
    print(json.dumps({
        "world_size": args.world_size, "matrices": len(plan.matrices), "buckets": len(plan.buckets),
        "imbalance": round(plan.imbalance(), 4), "layouts_seconds": round(t1 - t0, 3),
        "plan_seconds": round(t2 - t1, 3), "rank_schedule_seconds": round(t3 - t2, 3),
    }))


if __name__ == "__main__":
    main()
