"""QK-clip on the torchtitan debug model: max logit and loss with and without clipping, and its cost.

    python -m benchmarks.qk_clip                 # both: training curves (2 CPU ranks) and the per-step cost
    python -m benchmarks.qk_clip --train-only    # docs/benchmark_results/qk_clip.json, docs/qk_clip.png
    python -m benchmarks.qk_clip --cost-only     # docs/benchmark_results/qk_clip_cost.json

Training: llama3 "debugmodel" (configs/debug_cpu.toml) on 2 CPU ranks (FSDP 2) with a constant,
deliberately high Muon lr, twice from the same seed and data: once with QK-clip at τ, once with the
same hook recording the max logits but a threshold no head reaches (1e9: every factor is exactly
1, the weights are those of a run without QK-clip). Each logged step's max logit is the one of that
step's forward, i.e. of the weights left by the previous step's update and clip.

Cost, on one process (this machine's CPU): QK-clip's two parts timed alone, the max-logit
computation of every layer and the clip of every head, beside the model's forward + backward and
the optimizer step (fastest of timed repeats after warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmark_results"


def train_args(dump: str, steps: int, lr: float, tau: float) -> list[str]:
    return ["--job.config_file", "configs/debug_cpu.toml", "--job.dump_folder", dump, "--checkpoint.no-enable",
            "--training.steps", str(steps), "--optimizer.lr", str(lr), "--optimizer.qk_clip_threshold", str(tau),
            "--lr_scheduler.warmup_steps", "1", "--lr_scheduler.decay_type", "linear",
            "--lr_scheduler.min_lr_factor", "1.0", "--metrics.disable_color_printing"]


def parse(log: str) -> dict[str, dict[int, float]]:
    """step -> loss, max logit, heads clipped (the first rank's line of each step)."""
    out: dict[str, dict[int, float]] = {"loss": {}, "max_logit": {}, "heads_clipped": {}}
    for step, value in re.findall(r"step:\s*(\d+)\s+loss:\s*([-\d.eE+]+)", log):
        out["loss"].setdefault(int(step), float(value))
    for step, value, clipped in re.findall(r"step\s+(\d+)\s+QK-clip: max logit ([-\d.eE+inf]+), heads clipped (\d+)", log):
        out["max_logit"].setdefault(int(step), float(value))
        out["heads_clipped"].setdefault(int(step), int(clipped))
    return out


def run_training(steps: int, lr: float, tau: float, ranks: int = 2) -> dict:
    runs = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for name, threshold in (("clipped", tau), ("unclipped", 1e9)):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "launch.train", *train_args(os.path.join(tmp, name), steps, lr, threshold)]
            log = open(os.path.join(tmp, f"{name}.log"), "w")
            procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        for name, (proc, log) in procs.items():
            rc = proc.wait()
            log.close()
            text = open(log.name).read()
            if rc != 0:
                raise RuntimeError(f"{name} run failed (rc={rc}):\n{text[-4000:]}")
            runs[name] = parse(text)
    return {"config": "configs/debug_cpu.toml (llama3 debugmodel, FSDP 2, 2 CPU ranks)", "steps": steps, "lr": lr,
            "tau": tau, "runs": runs, **summary(runs, tau)}


def summary(runs: dict, tau: float) -> dict:
    clipped, unclipped = runs["clipped"], runs["unclipped"]
    first = min((s for s, n in clipped["heads_clipped"].items() if n > 0), default=None)
    after = [v for s, v in clipped["max_logit"].items() if first is not None and s > first]
    return {
        "first_clip_step": first,
        "unclipped_final_max_logit": unclipped["max_logit"][max(unclipped["max_logit"])],
        "clipped_max_logit_after_first_clip": max(after) if after else None,
        "clipped_mean_ratio_to_tau_after_first_clip": statistics.mean(after) / tau if after else None,
        "mean_loss": {n: statistics.mean(r["loss"].values()) for n, r in runs.items()},
        "mean_loss_last_10": {n: statistics.mean(sorted(r["loss"].items())[-10:][i][1] for i in range(10))
                              for n, r in runs.items()},
    }


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, style in (("unclipped", dict(color="C3")), ("clipped", dict(color="C0", linewidth=2))):
        run = result["runs"][name]
        label = "no QK-clip" if name == "unclipped" else f"QK-clip τ={result['tau']:g}"
        ax.plot(*zip(*sorted(run["max_logit"].items())), label=label, **style)
        ax2.plot(*zip(*sorted(run["loss"].items())), label=label, **style)
    ax.axhline(result["tau"], color="gray", linestyle="--", linewidth=1, label="τ")
    ax.set(xlabel="step", ylabel="max pre-softmax logit (this step's forward)", title="Max attention logit")
    ax2.set(xlabel="step", ylabel="loss", title="Training loss")
    for a in (ax, ax2):
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"llama3 debugmodel, DistMuon lr {result['lr']:g} (constant), FSDP 2 on 2 CPU ranks")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


# ----------------------------------------------------------------------------- cost on one process


def _best_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """The fastest of ``repeats`` timed calls (on a shared machine the least disturbed one)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_cost(repeats: int = 10, batch: int = 4, seq: int = 128) -> dict:
    """Per-step seconds of the debug model's forward+backward and DistMuon step, and of QK-clip's two
    parts timed alone: the max-logit computation of every layer (on the q and k the model's
    attention received) and the clip of every head."""
    import torch
    from torchtitan.models.llama3 import llama3_args
    from torchtitan.models.llama3.model.model import Transformer

    import dist_muon as dm
    from dist_muon.integrations.torchtitan import qk_logits

    torch.manual_seed(0)
    args = llama3_args["debugmodel"]
    args.max_seq_len = seq
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (batch, seq))
    found = qk_logits.attentions(model)
    seen = []
    handles = [a.module.inner_attention.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0].detach(), a[1].detach())), with_kwargs=True) for a in found]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(tokens).float().pow(2).mean().backward()

    fwd_bwd()
    for h in handles:
        h.remove()
    qks = seen[:len(found)]
    groups = dm.build_param_groups(model)
    plain = dm.DistMuon(groups, lr=0.0, ns_dtype=torch.float32)
    clipping = dm.DistMuon(groups, lr=0.0, ns_dtype=torch.float32, qk_clip_threshold=1e-3,
                           qk_clip_heads=[a.heads for a in found])
    maxima = torch.ones(clipping.qk_clip.n_heads)  # every head above τ: the whole clip runs
    hook = {}
    for chunk in (32, 128):
        hook[str(chunk)] = _best_seconds(
            lambda: [qk_logits.max_logits(q, k, q.shape[-1] ** -0.5, chunk=chunk) for q, k in qks], repeats)
    base, step = _best_seconds(fwd_bwd, repeats), _best_seconds(plain.step, repeats)
    clip = _best_seconds(lambda: clipping.qk_clip.apply(maxima, 1e-3, 0.5), repeats * 10)
    return {
        "model": "llama3 debugmodel (6 layers, 16 heads of 16, dim 256)", "batch": batch, "seq_len": seq,
        "threads": torch.get_num_threads(), "cpu": _cpu_name(), "statistic": f"fastest of {repeats} after warm-up",
        "forward_backward_s": base, "max_logit_hook_s": hook,
        "hook_fraction_of_forward_backward": {c: t / base for c, t in hook.items()},
        "optimizer_step_s": step, "clip_s": clip, "clip_fraction_of_step": clip / step,
    }


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--tau", type=float, default=8.0)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "qk_clip.png")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.cost_only:
        result = run_training(args.steps, args.lr, args.tau)
        (args.out / "qk_clip.json").write_text(json.dumps(result, indent=1))
        plot(result, args.plot)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if not args.train_only:
        cost = measure_cost()
        (args.out / "qk_clip_cost.json").write_text(json.dumps(cost, indent=1))
        print(json.dumps(cost, indent=1))


if __name__ == "__main__":
    main()
