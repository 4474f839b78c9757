"""What bf16 optimizer state costs in quality: torchtitan 0.2.2's llama3 debug model on CPU.

    python -m benchmarks.state_dtype_quality --steps 200 --json docs/benchmark_results/state_dtype_quality.json
    python -m benchmarks.state_dtype_quality --memory --json docs/benchmark_results/state_dtype_memory.json

Two training runs of ``configs/debug_cpu.toml`` (2 CPU ranks, FSDP, ``launch.train``), identical but
for ``--optimizer.state_dtype``: unset (fp32 state, as the fp32 parameters) and ``bfloat16``. Reported:

* the loss of both runs at every step (their final losses and the mean of the last 20 steps);
* the per-step update difference caused by the state's precision. The bf16 run carries a *shadow*
  DistMuon with fp32 state on copies of the parameters: before every step the shadow's parameters are
  set to the live ones and it gets the same (clipped) gradients, so the two updates differ only by what
  bf16 storage did to the momentum and AdamW moments accumulated so far (the shadow's state is never
  reset). Per step: ``‖Δ_bf16 − Δ_fp32‖ / ‖Δ_fp32‖`` over all parameters and for the worst parameter.
  The fp32 run carries the same shadow as a control (its difference must be 0).

``--memory`` instead measures, by the allocator (``benchmarks.measure``), the optimizer state a
DistMuon creates for a Llama-shaped set of fp32 parameters and the transient peak of one step, with
fp32 and with bf16 state (CUDA when available, else CPU).

Comparing the two runs' parameters directly would mostly measure how chaotic training is: any
perturbation, however small, grows along the trajectory. The losses show that trajectory-level cost;
the shadow shows the per-step one. Run from the repository root; about 10 minutes per 200-step run on 2
busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/debug_cpu.toml"


# ----------------------------------------------------------------------------- inside each training rank


class Shadow:
    """An fp32-state DistMuon following a live DistMuon's parameters; measures the update difference."""

    def __init__(self, opt):
        import torch
        from torch import nn

        import dist_muon as dm

        self.live = [p for g in opt.param_groups for p in g["params"]]
        self.names = [n for gi, g in enumerate(opt.param_groups) for n in opt._names(g, gi)]
        self.copies = [nn.Parameter(p.detach().clone()) for p in self.live]
        it = iter(self.copies)
        groups = []
        for g in opt.param_groups:
            group = {k: v for k, v in g.items() if k not in ("params", "state_dtype", "initial_lr")}
            group["params"] = [next(it) for _ in g["params"]]
            groups.append(group)
        self.opt = dm.DistMuon(groups, lr=opt._group_defaults["lr"], bucket_bytes=opt.bucket_bytes,
                               owner_policy=opt.owner_policy)
        self.opt.is_shadow = True  # the global hooks leave it alone
        self.before = [torch.empty_like(p) for p in self.copies]

    def pre(self, opt) -> None:
        import torch

        with torch.no_grad():
            for p, c, b in zip(self.live, self.copies, self.before):
                c.copy_(p)
                b.copy_(p)
                c.grad = None if p.grad is None else p.grad.detach().clone()  # step() overwrites Muon grads
        for g, s in zip(opt.param_groups, self.opt.param_groups):
            s["lr"] = g["lr"]

    def post(self) -> dict:
        import torch
        import torch.distributed as dist

        from dist_muon import comm

        self.opt.step()
        sums = []
        with torch.no_grad():
            for p, c, b in zip(self.live, self.copies, self.before):
                d_live, d_ref = comm.local_tensor(p) - comm.local_tensor(b), comm.local_tensor(c) - comm.local_tensor(b)
                sums.append(torch.stack([(d_live - d_ref).double().pow(2).sum(), d_ref.double().pow(2).sum()]))
        sums = torch.stack(sums)
        if dist.is_initialized():  # FSDP shards partition every parameter: local sums add up
            dist.all_reduce(sums)
        diff, ref = sums[:, 0], sums[:, 1]
        per_param = (diff / ref.clamp_min(1e-300)).sqrt()
        worst = int(per_param.argmax())
        return {"update_difference": float((diff.sum() / ref.sum()).sqrt()),
                "worst_parameter": self.names[worst], "worst_parameter_difference": float(per_param[worst])}


def _install_shadow_hooks(log_path: str) -> None:
    """Global optimizer step hooks: every DistMuon gets a shadow on its first step."""
    import torch
    import torch.distributed as dist

    import dist_muon as dm

    shadows: dict[int, Shadow] = {}
    step = [0]

    def followed(opt) -> bool:
        return isinstance(opt, dm.DistMuon) and not getattr(opt, "is_shadow", False)

    def pre(opt, args, kwargs):
        if followed(opt):
            if id(opt) not in shadows:
                shadows[id(opt)] = Shadow(opt)
            shadows[id(opt)].pre(opt)

    def post(opt, args, kwargs):
        if followed(opt):
            record = shadows[id(opt)].post()
            step[0] += 1
            if not dist.is_initialized() or dist.get_rank() == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step[0], **record}) + "\n")

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)


def worker(argv: list[str]) -> None:
    """torchrun entry: ``--worker LOG -- <launch.train arguments>``."""
    log_path, train_args = argv[1], argv[argv.index("--") + 1:]
    from launch import train

    _install_shadow_hooks(log_path)
    train.main(train_args)


# ----------------------------------------------------------------------------- the driver


def losses(log: str) -> dict[int, float]:
    text = re.sub(r"\x1b\[[0-9;]*m", "", log)
    return {int(s): float(v) for s, v in re.findall(r"step:\s*(\d+)\s+loss:\s*([-\d.eE+na]+)", text)}


def run(state_dtype: str | None, steps: int, workdir: Path) -> dict:
    updates = workdir / f"updates_{state_dtype or 'fp32'}.jsonl"
    updates.unlink(missing_ok=True)
    train_args = ["--job.config_file", CONFIG, "--job.dump_folder", str(workdir / (state_dtype or "fp32")),
                  "--training.steps", str(steps), "--checkpoint.no-enable", "--metrics.log_freq", "1"]
    if state_dtype is not None:
        train_args += ["--optimizer.state_dtype", state_dtype]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "benchmarks.state_dtype_quality", "--worker", str(updates), "--", *train_args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"training run failed ({done.returncode}):\n{log[-5000:]}")
    records = [json.loads(line) for line in updates.read_text().splitlines()]
    return {"losses": losses(log), "updates": records}


def summarize(fp32: dict, bf16: dict, steps: int) -> dict:
    def tail_mean(loss: dict[int, float]) -> float:
        last = [loss[s] for s in range(max(1, steps - 19), steps + 1)]
        return sum(last) / len(last)

    worst = max(bf16["updates"], key=lambda r: r["worst_parameter_difference"])
    return {
        "steps": steps,
        "config": CONFIG,
        "final_loss": {"fp32_state": fp32["losses"][steps], "bf16_state": bf16["losses"][steps]},
        "mean_loss_last_20": {"fp32_state": tail_mean(fp32["losses"]), "bf16_state": tail_mean(bf16["losses"])},
        "worst_update_difference": max(r["update_difference"] for r in bf16["updates"]),
        "median_update_difference": sorted(r["update_difference"] for r in bf16["updates"])[len(bf16["updates"]) // 2],
        "worst_parameter": {k: worst[k] for k in ("step", "worst_parameter", "worst_parameter_difference")},
        "control_fp32_vs_fp32_worst": max(r["update_difference"] for r in fp32["updates"]),
        "per_step": [{"step": s, "loss_fp32_state": fp32["losses"].get(s), "loss_bf16_state": bf16["losses"].get(s),
                      "update_difference": u["update_difference"]}
                     for s, u in zip(range(1, steps + 1), bf16["updates"])],
    }


MEMORY_LAYERS, DIM, FFN, VOCAB = 4, 512, 1536, 8000


def memory(device: str) -> dict:
    """State bytes (what constructing DistMuon keeps) and one step's transient peak, fp32 vs bf16 state."""
    import torch
    from torch import nn

    import dist_muon as dm
    from benchmarks.measure import peak_transient_bytes, retained_and_peak_bytes

    shapes = [(DIM, DIM)] * 4 + [(FFN, DIM), (FFN, DIM), (DIM, FFN)]
    out = {"device": device, "parameters": f"{MEMORY_LAYERS} layers of dim {DIM}, ffn {FFN}, vocab {VOCAB}, fp32"}
    for name, state_dtype in (("fp32_state", None), ("bf16_state", torch.bfloat16)):
        g = torch.Generator(device=device).manual_seed(0)
        make = lambda *s: nn.Parameter(torch.randn(*s, generator=g, device=device) * 0.02)  # noqa: E731
        matrices = [make(*s) for _ in range(MEMORY_LAYERS) for s in shapes]
        others = [make(VOCAB, DIM), make(VOCAB, DIM)] + [make(DIM) for _ in range(2 * MEMORY_LAYERS + 1)]
        groups = [{"params": matrices, "algorithm": "muon"}, {"params": others, "algorithm": "adamw"}]
        made = []
        state, _ = retained_and_peak_bytes(
            lambda: made.append(dm.DistMuon(groups, lr=0.02, weight_decay=0.01, state_dtype=state_dtype,
                                            bucket_bytes=16 * 2**20)), device)
        opt = made[0]
        for warm in (True, False):
            for p in matrices + others:
                p.grad = torch.randn(p.shape, generator=g, device=device)
            if warm:
                opt.step()
        peak = peak_transient_bytes(opt.step, device)
        params = sum(p.numel() * p.element_size() for p in matrices + others)
        out[name] = {"parameter_bytes": params, "state_bytes": state, "step_peak_transient_bytes": peak,
                     "state_plus_peak_bytes": state + peak}
    out["state_ratio"] = out["bf16_state"]["state_bytes"] / out["fp32_state"]["state_bytes"]
    return out


def main() -> None:
    if "--worker" in sys.argv:
        worker(sys.argv[sys.argv.index("--worker"):])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--memory", action="store_true", help="measure state memory instead of training")
    args = parser.parse_args()
    if args.memory:
        import torch

        result = memory("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = run(None, args.steps, Path(tmp))
        bf16 = run("bfloat16", args.steps, Path(tmp))
    result = summarize(fp32, bf16, args.steps)
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
