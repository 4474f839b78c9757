"""A small FSDP2 training script with DistMuon, DCP checkpoints, resume and fault injection.

Copy it and replace the model and data. Runs on CPU (gloo) and GPU (nccl):

    torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 20 --ckpt-dir /tmp/ckpt --ckpt-every 5

Elastic restarts resume from the latest *complete* checkpoint (a checkpoint interrupted while
being written is never used):

    DIST_MUON_FAULT=1:7 torchrun --nproc_per_node 2 --max-restarts 1 examples/train_fsdp.py \\
        --steps 20 --ckpt-dir /tmp/ckpt --ckpt-every 5

``DIST_MUON_FAULT=RANK:STEP`` kills RANK (SIGKILL) just before it runs STEP;
``DIST_MUON_FAULT=RANK:STEP:save`` kills it while the checkpoint of STEP is being written (after its
``dcp.save`` returned, before the checkpoint is committed). Faults fire only on the first attempt
(``TORCHELASTIC_RESTART_COUNT == 0``), so the restarted run goes through.
Resuming on a different number of ranks works too: DCP reshards parameters and optimizer state.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import dist_muon as dm  # noqa: E402
from dist_muon import checkpoint as ckpt  # noqa: E402

# ----------------------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-norm block: a (causal-free, toy) attention-like mixer and an MLP or a soft MoE."""

    def __init__(self, dim: int, hidden: int, experts: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # fused QKV: orthogonalized per block
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.experts = experts
        if experts:
            self.router = nn.Linear(dim, experts, bias=False)
            self.w_in = nn.Parameter(torch.randn(experts, hidden, dim) / math.sqrt(dim))  # 3D [E, M, N]
            self.w_out = nn.Parameter(torch.randn(experts, dim, hidden) / math.sqrt(hidden))
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.proj(att @ v)
        h = self.norm2(x)
        if self.experts:
            gates = torch.softmax(self.router(h), dim=-1)  # [B, T, E]
            inner = F.gelu(torch.einsum("btd,ehd->bteh", h, self.w_in))
            out = torch.einsum("bteh,edh->bted", inner, self.w_out)
            return x + (gates.unsqueeze(-1) * out).sum(dim=2)
        return x + self.fc2(F.gelu(self.fc1(h)))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=32, hidden=64, layers=2, experts=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, hidden, experts if i % 2 else 0) for i in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


# ----------------------------------------------------------------------------- helpers


def batch(step: int, rank: int, world: int, args, device) -> torch.Tensor:
    """Synthetic tokens: the global batch depends only on (seed, step); each rank takes its rows."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    tokens = torch.randint(0, args.vocab, (args.global_batch, args.seq + 1), generator=g)
    return tokens[rank::world].to(device)


def parse_fault():
    """(rank, step, phase) from DIST_MUON_FAULT, only on the first attempt of an elastic run."""
    spec = os.environ.get("DIST_MUON_FAULT")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return None
    parts = spec.split(":")
    return int(parts[0]), int(parts[1]), (parts[2] if len(parts) > 2 else "train")


def die(rank: int, step: int, phase: str) -> None:
    print(f"[fault injection] killing rank {rank} at step {step} ({phase})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        dm.canonical_fqn(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
        for n, p in model.named_parameters()
    }


def init_distributed(backend: str, timeout_s: float) -> None:
    """init_process_group, with the store keys of each elastic attempt kept apart.

    With ``--rdzv-backend c10d`` the restarted workers reuse the agent's TCPStore, which still
    holds the previous attempt's process-group keys (peer addresses of dead workers); a restarted
    rank may read them and fail with "Gloo connectFullMesh failed ... Connection refused". Prefixing
    the store with the restart count gives every attempt fresh keys.
    """
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # A collective timeout turns a hang (a peer stuck or gone) into an error, and an elastic restart.
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the job cleanly, every rank at once.

    ``train`` has returned, so what holds the process group or its pending work (FSDP model,
    optimizer, meshes) is freed here, while the group is alive; then every rank waits for the others
    and the group is destroyed while the interpreter is whole. Destroying the group under live
    users, or leaving them to interpreter teardown, can abort a rank that had finished ("terminate
    called without an active exception", gloo), which torchrun counts as a failure.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ckpt-dir", default=None, help="checkpoint root; resume from its latest complete checkpoint")
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--final-out", default=None, help="torch.save the final full parameters here (rank 0)")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ns-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="Newton-Schulz dtype; auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--collective-timeout", type=float, default=600,
                        help="seconds a collective may wait for the other ranks before the job fails")
    parser.add_argument("--no-moe", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=50)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--global-batch", type=int, default=8)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_distributed("nccl" if use_cuda else "gloo", args.collective_timeout)
    train(args, torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"))
    shutdown()


def train(args, device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    fault = parse_fault()

    # Identical initialisation on every rank, then shard: each block, then the root.
    torch.manual_seed(args.seed)
    model = TinyLM(vocab=args.vocab, experts=0 if args.no_moe else 4).to(device)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # Route parameters (embedding, head, norms, biases → AdamW; matrices → Muon) and say how.
    groups = dm.build_param_groups(model, rules=[(r"\.qkv\.weight$", {"split_sizes": (32, 32, 32)})])
    optimizer = dm.DistMuon(
        groups, lr=args.lr, adamw_lr=args.adamw_lr, weight_decay=args.weight_decay,
        ns_dtype=args.ns_dtype,
    )
    warmup = max(1, args.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    if rank == 0:
        print(dm.routing_report(optimizer), flush=True)

    start = 0
    if args.ckpt_dir:
        start = ckpt.resume(args.ckpt_dir, model, optimizer, lr_schedulers=[scheduler])
        if rank == 0:
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            print(f"attempt {attempt}: " + (f"resumed from step {start}" if start else "starting from scratch"), flush=True)

    def killer(step):
        if fault and fault[0] == rank and fault[1] == step and fault[2] == "save":
            return lambda tmp_path: die(rank, step, "save")
        return None

    for step in range(start, args.steps):
        if fault and fault[0] == rank and fault[1] == step and fault[2] == "train":
            die(rank, step, "train")
        tokens = batch(step, rank, world, args, device)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if rank == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.5f}  lr {scheduler.get_last_lr()[0]:.5f}", flush=True)
        done = step + 1
        if args.ckpt_dir and args.ckpt_every and (done % args.ckpt_every == 0 or done == args.steps):
            path = ckpt.save_checkpoint(args.ckpt_dir, done, model, optimizer, lr_schedulers=[scheduler],
                                        keep_last=args.keep_last, on_written=killer(done))
            if rank == 0:
                print(f"saved {path}", flush=True)

    final = full_params(model)  # collective: every rank gathers
    if rank == 0 and args.final_out:
        torch.save(final, args.final_out)
        print(f"final parameters saved to {args.final_out}", flush=True)


if __name__ == "__main__":
    main()
