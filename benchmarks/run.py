"""Side-by-side optimizer-step benchmark: DistMuon vs a naive baseline, PyPI peers, torch.optim.Muon, AdamW.

    python -m benchmarks.run --world-size 4 --json docs/benchmark_results/w4.json

One command: it first runs the reference, ``torch.optim.Muon`` on full tensors in this process
(its update and step time), then spawns W processes (torch.multiprocessing spawn; gloo on CPU,
NCCL on CUDA) that build the same Llama-like stack of matrices on every rank, shard it with FSDP2
``fully_shard`` on a 1-D mesh, and for every implementation in turn: a fresh copy of the model
(identical initial weights), fixed identical gradients, one checked step (its update is compared
with the reference's), warmup steps, then timed steps. Each timed step is ``barrier; t0;
opt.step(); barrier; t1`` so it is the slowest rank's time. Every process runs with
``torch.set_num_threads(1)`` (``--threads``) so W processes share the cores fairly.

Newton–Schulz runs in ``--ns-dtype`` (default ``auto``: bfloat16 on CUDA, float32 on CPU, whose
bf16 matmuls are ~10x slower), the reference included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from . import peers, rendezvous

# d, layers, heads, kv heads, ffn hidden. ffn ≈ 2.7·d rounded to a multiple of 64; all dims divide 64
# so every FSDP2 shard is even for W in {1, 2, 4, 8} (muon-fsdp2 needs that).
MODELS = {
    "tiny": dict(dim=128, layers=1, heads=4, kv_heads=2, ffn=384),
    "cpu": dict(dim=512, layers=2, heads=8, kv_heads=4, ffn=1408),  # the CPU default: minutes on 2 cores at W=4
    "small": dict(dim=1024, layers=2, heads=16, kv_heads=4, ffn=2752),
    "medium": dict(dim=1024, layers=4, heads=16, kv_heads=4, ffn=2752),
}

REL_ERR_OK = 5e-2  # implementations differ by NS rounding only (~1e-3..1e-2 in bf16, far less in fp32)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, ffn):
        super().__init__()
        head_dim = dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)


class Stack(nn.Module):
    def __init__(self, dim, layers, heads, kv_heads, ffn):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim, heads, kv_heads, ffn) for _ in range(layers))


def make_model(preset: str) -> Stack:
    torch.manual_seed(0)
    return Stack(**MODELS[preset])


def fixed_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full-size gradients, identical on every rank and for every implementation."""
    gen = torch.Generator().manual_seed(1234)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- worker


def _set_grads(params, names, grads, rank, world):
    from torch.distributed.tensor import DTensor

    for p, n in zip(params, names):
        full = grads[n]
        if isinstance(p, DTensor):
            local = torch.chunk(full, world, dim=0)[rank].clone().to(p.device)  # peers mutate grads in place
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        else:
            p.grad = full.clone().to(p.device)


def _full(p):
    from torch.distributed.tensor import DTensor

    # clone: at W=1 full_tensor() may alias the parameter, and a "before" snapshot must not move with it
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()


def _rel_err(delta: dict, ref: dict) -> tuple[float, float, dict]:
    """‖Δ − Δref‖/‖Δref‖ over all parameters, the worst single parameter, and per parameter."""
    num = sum(float((delta[n] - ref[n]).pow(2).sum()) for n in ref)
    den = sum(float(ref[n].pow(2).sum()) for n in ref)
    per = {n: float((delta[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in ref}
    return (num / den) ** 0.5, max(per.values()), per


@contextmanager
def _torch_muon_ns_dtype(dtype: torch.dtype):
    """torch.optim.Muon with its Newton–Schulz in ``dtype`` (torch hard-codes bfloat16, slow on CPU).

    The loop is torch/optim/_muon.py's ``_zeropower_via_newtonschulz`` with only the cast changed.
    """
    from torch.optim import _muon

    original = _muon._zeropower_via_newtonschulz

    def ns(grad, ns_coefficients, ns_steps, eps):
        a, b, c = ns_coefficients
        x = grad.to(dtype)
        if grad.size(0) > grad.size(1):
            x = x.T
        x = x / x.norm().clamp(min=eps)
        for _ in range(ns_steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if grad.size(0) > grad.size(1) else x

    _muon._zeropower_via_newtonschulz = original if dtype == torch.bfloat16 else ns
    try:
        yield
    finally:
        _muon._zeropower_via_newtonschulz = original


def _reference(args, device) -> tuple[dict, list[float]]:
    """torch.optim.Muon in one process on full tensors: the reference update and its step times.

    Run before any worker starts, so no rank waits on it and its timing has the machine to itself.
    """
    grads = fixed_grads(make_model(args.model))
    model = make_model(args.model).to(device)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    opt = torch.optim.Muon(params, lr=args.lr, momentum=peers.MOMENTUM, nesterov=True, weight_decay=0.0,
                           ns_steps=peers.NS_STEPS)  # quintic (3.4445, -4.775, 2.0315), eps 1e-7
    before = {n: p.detach().float().cpu().clone() for n, p in zip(names, params)}
    times = []
    with _torch_muon_ns_dtype(args.ns_dtype):
        _set_grads(params, names, grads, 0, 1)
        opt.step()
        ref = {n: p.detach().float().cpu() - before[n] for n, p in zip(names, params)}
        for i in range(args.warmup - 1 + args.steps):
            _set_grads(params, names, grads, 0, 1)
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            if i >= args.warmup - 1:
                times.append(time.perf_counter() - t0)
    return ref, times


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _bench_one(name, args, grads, rank, world, device, mesh):
    from torch.distributed.fsdp import fully_shard

    builder, _ = peers.DISTRIBUTED[name]
    model = make_model(args.model).to(device)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    settings = peers.Settings(lr=args.lr, world=world, device=device.type, bucket_bytes=args.bucket_bytes,
                              eager_peers=args.eager_peers, ns_dtype=args.ns_dtype)
    opt = builder(params, names, settings)  # may raise peers.Unavailable (same on every rank)
    before = {n: _full(p) for n, p in zip(names, params)}
    _set_grads(params, names, grads, rank, world)
    opt.step()
    delta = {n: _full(p) - before[n] for n, p in zip(names, params)}
    times, stats = [], []
    for i in range(args.warmup - 1 + args.steps):
        _set_grads(params, names, grads, rank, world)
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        dist.barrier()
        if i >= args.warmup - 1:
            times.append(time.perf_counter() - t0)
            if getattr(opt, "last_step_stats", None) is not None:
                stats.append(opt.last_step_stats.as_dict())
    extra = {}
    if name == "dist_muon":
        from .measure import peak_transient_bytes

        _set_grads(params, names, grads, rank, world)
        dist.barrier()
        peak = peak_transient_bytes(opt.step, device)  # the allocator's account, not the optimizer's own
        extra = dict(imbalance=opt.plan.imbalance(), bucket_bytes=opt.bucket_bytes,
                     largest_matrix_bytes=max(m.nbytes for m in opt.plan.matrices), buckets=len(opt.plan.buckets),
                     plan=opt.plan.describe(), stats=stats, peak_step_bytes=peak)
    elif name == "naive":
        extra = dict(peak_full_bytes=opt.peak_full_bytes)
    return delta, times, extra


def _use_cuda(args) -> bool:
    return torch.cuda.is_available() and not args.cpu


def _worker(rank, world, port, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    cuda = _use_cuda(args)
    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # A peer that fails on one rank only would leave the others in a collective: time out instead of hanging.
    rendezvous.init_process_group("nccl" if cuda else "gloo", rank, world, port, args.collective_timeout)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
        grads = fixed_grads(make_model(args.model))
        result = {"seconds": {}, "step_times": {}, "rel_error": {}, "rel_error_worst_param": {}, "status": {},
                  "notes": {n: note for n, (_, note) in peers.DISTRIBUTED.items()}}
        ref = torch.load(args.ref_path) if rank == 0 else None
        for name in args.impls:
            try:
                delta, times, extra = _bench_one(name, args, grads, rank, world, device, mesh)
            except peers.Unavailable as e:
                result["status"][name] = f"skipped: {e}"
                dist.barrier()
                continue
            except Exception as e:  # noqa: BLE001 - a peer that crashes is recorded, not hidden
                result["status"][name] = f"failed: {type(e).__name__}: {e}"
                result.setdefault("tracebacks", {})[name] = traceback.format_exc()
                # a crash may leave ranks out of step; one rank's failure is reported, the rest carry on
                continue
            result["status"][name] = "ok"
            result["seconds"][name] = statistics.median(times)
            result["step_times"][name] = times
            if name == "dist_muon":
                per_rank = [None] * world
                dist.all_gather_object(per_rank, extra.pop("stats"))
                extra["per_rank_stats"] = per_rank  # [rank][timed step] -> StepStats.as_dict()
                peaks = [None] * world
                dist.all_gather_object(peaks, extra.pop("peak_step_bytes"))
                extra["per_rank_peak_step_bytes"] = peaks
            if name == "naive":
                result["naive_peak_full_bytes"] = extra.pop("peak_full_bytes")
            result.update({k: v for k, v in extra.items()})
            if rank == 0:
                if name == "adamw":
                    result["rel_error"][name] = None  # a different algorithm: the floor, not checked
                else:
                    err, worst, per = _rel_err(delta, ref)
                    result["rel_error"][name], result["rel_error_worst_param"][name] = err, worst
                    result.setdefault("rel_error_per_param", {})[name] = per
        if rank == 0:
            queue.put(("ok", result))
    except BaseException as e:  # noqa: BLE001
        if rank == 0:
            queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- driver


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("muon_fsdp2", "dtensor_muon", "torchtitan"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001
            info[pkg] = None
    return info


def summarize(result: dict, args) -> dict:
    stats = result.pop("per_rank_stats", None)
    out = {"world_size": args.world_size, "model": args.model, "model_config": MODELS[args.model],
           "seconds": result["seconds"]}
    if stats is not None:
        # transient memory of one dist_muon step, worst rank, from the allocator (benchmarks.measure)
        out["extra_mem_bytes"] = max(result.pop("per_rank_peak_step_bytes"))
        out["ns_flops_per_rank"] = [rank[-1]["ns_flops"] for rank in stats]
        out["dist_muon_stats_rank0_median"] = {
            k: statistics.median(s[k] for s in stats[0]) for k in ("comm_seconds", "ns_seconds", "bytes_sent",
                                                                    "bytes_received")}
        out["dist_muon_per_rank_last_step"] = [rank[-1] for rank in stats]
    for k in ("imbalance", "bucket_bytes", "largest_matrix_bytes", "buckets", "naive_peak_full_bytes"):
        if k in result:
            out[k] = result[k]
    sec = result["seconds"]
    if "dist_muon" in sec:
        out["speedup_vs_dist_muon"] = {k: v / sec["dist_muon"] for k, v in sec.items()}
    if "extra_mem_bytes" in out and "bucket_bytes" in out:
        out["mem_bound_bytes"] = out["bucket_bytes"] + out["largest_matrix_bytes"]
        out["mem_bound_ok"] = out["extra_mem_bytes"] <= out["mem_bound_bytes"]
    out["rel_error"] = result["rel_error"]
    out["rel_error_worst_param"] = result["rel_error_worst_param"]
    out["rel_error_per_param"] = result.get("rel_error_per_param", {})
    out["rel_error_ok"] = {k: (v is None or v <= REL_ERR_OK) for k, v in result["rel_error"].items()}
    out["status"] = result["status"]
    out["notes"] = result["notes"]
    if result.get("tracebacks"):
        out["tracebacks"] = result["tracebacks"]
    out["step_times"] = result["step_times"]
    out["plan"] = result.get("plan")
    out["settings"] = dict(lr=args.lr, momentum=peers.MOMENTUM, nesterov=True, weight_decay=0.0,
                           ns=f"quintic (3.4445, -4.7750, 2.0315), 5 steps, {str(args.ns_dtype).replace('torch.', '')}",
                           adjust_lr="sqrt(max(1, m/n))",
                           threads_per_process=args.threads, eager_peers=args.eager_peers, warmup=args.warmup, steps=args.steps,
                           timing="median over timed steps of barrier-to-barrier opt.step() wall time")
    out["machine"] = machine()
    out["command"] = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--model", choices=sorted(MODELS), default=None,
                    help="model preset; default: small on CUDA, cpu (1/8 of small's NS work) elsewhere")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first is the checked one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--bucket-mib", type=float, default=16.0, help="DistMuon bucket_bytes in MiB")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--impls", default=",".join(peers.DISTRIBUTED), help="comma-separated subset")
    ap.add_argument("--eager-peers", action="store_true",
                    help="disable torch.compile inside peers (muon-fsdp2, dtensor-muon): a fast smoke run; "
                         "timings then are not the peers' defaults")
    ap.add_argument("--cpu", action="store_true", help="stay on CPU/gloo even if CUDA exists")
    ap.add_argument("--ns-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="Newton-Schulz dtype of every implementation and the reference; auto: bfloat16 on CUDA, "
                         "float32 on CPU")
    ap.add_argument("--timeout", type=float, default=1800, help="whole run, seconds")
    ap.add_argument("--collective-timeout", type=float, default=300, help="per collective, seconds")
    args = ap.parse_args(argv)
    args.warmup = max(1, args.warmup)
    args.bucket_bytes = int(args.bucket_mib * 2**20)
    args.impls = [s for s in args.impls.split(",") if s]
    args.model = args.model or ("small" if _use_cuda(args) else "cpu")
    args.ns_dtype = getattr(torch, args.ns_dtype) if args.ns_dtype != "auto" else (
        torch.bfloat16 if _use_cuda(args) else torch.float32)
    unknown = set(args.impls) - set(peers.DISTRIBUTED)
    if unknown:
        ap.error(f"unknown --impls {sorted(unknown)}; choose from {list(peers.DISTRIBUTED)}")

    torch.set_num_threads(args.threads)
    ref, ref_times = _reference(args, torch.device("cuda") if _use_cuda(args) else torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        args.ref_path = os.path.join(tmp, "reference.pt")
        torch.save(ref, args.ref_path)
        del ref
        kind, payload = _spawn(args)
    if kind != "ok":
        raise SystemExit(f"benchmark failed: {payload}")
    payload["seconds"]["torch_muon_single"] = statistics.median(ref_times)
    payload["step_times"]["torch_muon_single"] = ref_times
    payload["rel_error"]["torch_muon_single"] = 0.0
    payload["status"] = {"torch_muon_single": "ok", **payload["status"]}
    payload["notes"]["torch_muon_single"] = "torch.optim.Muon, one process, full tensors: the reference"
    out = summarize(payload, args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(format_table(out))
    return out


def _spawn(args) -> tuple[str, object]:
    """Run the workers; ("ok", rank 0's result) or ("error", why). A rank that dies ends the run at once."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    store = rendezvous.store_server(args.world_size)
    procs = [ctx.Process(target=_worker, args=(r, args.world_size, store.port, args, queue))
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + args.timeout
    answer = None
    try:
        while answer is None:
            if not queue.empty():  # read while rank 0 may still be writing (a full pipe would block it)
                answer = queue.get()
                break
            failed = any(p.exitcode not in (None, 0) for p in procs)
            if failed or not any(p.is_alive() for p in procs):
                if procs[0].is_alive():  # rank 0 reports the error it saw, if the dead rank took it down
                    procs[0].join(timeout=30)
                answer = queue.get() if not queue.empty() else (
                    "error", f"no result from rank 0; exit codes by rank {[p.exitcode for p in procs]}")
            elif time.monotonic() > deadline:
                answer = ("error", f"not finished after --timeout {args.timeout:g}s although no collective timed out "
                                   f"(--collective-timeout {args.collective_timeout:g}s); raise --timeout")
            else:
                time.sleep(0.2)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return answer


def format_table(out: dict) -> str:
    sec = out["seconds"]
    base = sec.get("dist_muon")
    lines = [f"world_size={out['world_size']} model={out['model']}",
             "| implementation | step (s) | × dist_muon time | rel. error vs torch.optim.Muon | status |",
             "|---|---|---|---|---|"]
    for name, status in out["status"].items():
        s = sec.get(name)
        err = out["rel_error"].get(name)
        lines.append(f"| {name} | {'' if s is None else f'{s:.3f}'} | "
                     f"{'' if s is None or not base else f'{s / base:.2f}'} | "
                     f"{'n/a' if err is None else f'{err:.1e}'} | {status} |")
    for k in ("imbalance", "extra_mem_bytes", "bucket_bytes", "largest_matrix_bytes"):
        if k in out:
            lines.append(f"{k}: {out[k]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
