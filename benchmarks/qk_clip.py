"""QK-clip on the torchtitan debug model: max logit and loss with and without clipping, and its cost.

    python -m benchmarks.qk_clip                     # everything below
    python -m benchmarks.qk_clip --train-only        # both regimes' curves (2 CPU ranks each)
    python -m benchmarks.qk_clip --regime low_lr     # docs/benchmark_results/qk_clip_low_lr.json, docs/qk_clip_low_lr.png
    python -m benchmarks.qk_clip --cost-only         # docs/benchmark_results/qk_clip_cost.json

Training: llama3 "debugmodel" (configs/debug_cpu.toml) on 2 CPU ranks (FSDP 2) with a constant Muon
lr, twice from the same seed and data: once with QK-clip at τ, once with the same hook recording
the max logits but a threshold no head reaches (1e9: every factor is exactly 1, the weights are
those of a run without QK-clip). Each logged step's max logit is the one of that step's forward,
i.e. of the weights left by the previous step's update and clip. Two regimes (REGIMES): ``high_lr``
(lr 0.1 on the c4 sample: the logits grow fast, the clip caps them with an overshoot of about one
step's change) and ``low_lr`` (one fixed batch, a per-step change below 1e-3: every next forward
stays within τ (1 + 1e-3), the issue's bound; tests/test_qk_clip.py trains it).

Cost, on one process (this machine's CPU): QK-clip's two parts timed alone, the max-logit
computation of every layer and the clip of every head, beside the model's forward + backward and
the optimizer step (fastest of timed repeats after warm-up).
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Regime:
    """One setting of the before/after comparison (constant lr after one warm-up step)."""

    lr: float  # Muon lr
    tau: float
    steps: int
    adamw_lr: float | None = None  # None: configs/debug_cpu.toml's
    repeated_document: bool = False  # one fixed batch (2 sequences per rank) instead of assets/c4_tiny
    note: str = ""


REGIMES = {
    # the max logit grows by 5-8 % per step: the clip visibly caps it, a step's update overshoots τ
    "high_lr": Regime(lr=0.1, tau=8.0, steps=40, note="assets/c4_tiny, batch 4 x 128"),
    # every head's logit changes by < 1e-3 per step (one fixed batch, a Muon lr at which the fastest
    # head grows by 7e-4 per step): the bound, every next forward <= τ (1 + 1e-3), holds
    "low_lr": Regime(lr=3e-4, tau=0.44202, steps=40, adamw_lr=3e-5, repeated_document=True,
                     note="one repeated document, batch 2 x 32"),
}
UNCLIPPED = 1e9  # a threshold no head reaches: the hook records the maxima, every factor is exactly 1


def train_args(dump: str, regime: Regime, clip: bool, data: tuple[str, int] | None = None) -> list[str]:
    """launch.train arguments; ``data``: (folder, seq_len) of a repeated document (``regime.repeated_document``)."""
    args = ["--job.config_file", "configs/debug_cpu.toml", "--job.dump_folder", dump, "--checkpoint.no-enable",
            "--training.steps", str(regime.steps), "--optimizer.lr", str(regime.lr),
            "--optimizer.qk_clip_threshold", str(regime.tau if clip else UNCLIPPED),
            "--lr_scheduler.warmup_steps", "1", "--lr_scheduler.decay_type", "linear",
            "--lr_scheduler.min_lr_factor", "1.0", "--metrics.disable_color_printing"]
    if regime.adamw_lr is not None:
        args += ["--optimizer.adamw_lr", str(regime.adamw_lr)]
    if regime.repeated_document:
        if data is None:
            raise ValueError("this regime trains on a repeated document: pass data=(folder, seq_len)")
        args += ["--training.dataset_path", str(data[0]), "--training.seq_len", str(data[1]),
                 "--training.local_batch_size", "2"]
    return args


def repeated_document(folder: Path) -> tuple[str, int]:
    from benchmarks.repeated_document import packing_022, write_repeated_document

    return str(folder), write_repeated_document(folder, packing_022())


def parse(log: str) -> dict[str, dict[int, float]]:
    """step -> loss, max logit, heads clipped (the first rank's line of each step)."""
    out: dict[str, dict[int, float]] = {"loss": {}, "max_logit": {}, "heads_clipped": {}}
    for step, value in re.findall(r"step:\s*(\d+)\s+loss:\s*([-\d.eE+]+)", log):
        out["loss"].setdefault(int(step), float(value))
    for step, value, clipped in re.findall(r"step\s+(\d+)\s+QK-clip: max logit ([-\d.eE+inf]+), heads clipped (\d+)", log):
        out["max_logit"].setdefault(int(step), float(value))
        out["heads_clipped"].setdefault(int(step), int(clipped))
    return out


def run_training(regime: Regime, ranks: int = 2) -> dict:
    runs = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        data = repeated_document(Path(tmp)) if regime.repeated_document else None
        procs = {}
        for name, clip in (("clipped", True), ("unclipped", False)):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "launch.train", *train_args(os.path.join(tmp, name), regime, clip, data)]
            log = open(os.path.join(tmp, f"{name}.log"), "w")
            procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        for name, (proc, log) in procs.items():
            rc = proc.wait()
            log.close()
            text = open(log.name).read()
            if rc != 0:
                raise RuntimeError(f"{name} run failed (rc={rc}):\n{text[-4000:]}")
            runs[name] = parse(text)
    return {"config": f"configs/debug_cpu.toml (llama3 debugmodel, FSDP 2, {ranks} CPU ranks), {regime.note}",
            "regime": dataclasses.asdict(regime), "steps": regime.steps, "lr": regime.lr, "tau": regime.tau,
            "runs": runs, **summary(runs, regime.tau)}


def first_clip(run: dict) -> int | None:
    return min((s for s, n in run["heads_clipped"].items() if n > 0), default=None)


def largest_step_change(run: dict) -> float:
    """The largest relative change of the max logit from one step to the next."""
    logits = [v for _, v in sorted(run["max_logit"].items())]
    return max(abs(b / a - 1) for a, b in zip(logits, logits[1:]))


def summary(runs: dict, tau: float) -> dict:
    clipped, unclipped = runs["clipped"], runs["unclipped"]
    first = first_clip(clipped)
    after = [v for s, v in clipped["max_logit"].items() if first is not None and s > first]
    return {
        "first_clip_step": first,
        "unclipped_final_max_logit": unclipped["max_logit"][max(unclipped["max_logit"])],
        "unclipped_largest_step_change": largest_step_change(unclipped),
        "clipped_max_logit_after_first_clip": max(after) if after else None,
        "clipped_max_ratio_to_tau_after_first_clip": max(after) / tau if after else None,
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
    ax.axhline(result["tau"] * (1 + 1e-3), color="gray", linestyle=":", linewidth=1, label="τ (1 + 1e-3)")
    ax.set(xlabel="step", ylabel="max pre-softmax logit (this step's forward)", title="Max attention logit")
    ax2.set(xlabel="step", ylabel="loss", title="Training loss")
    for a in (ax, ax2):
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"llama3 debugmodel, DistMuon lr {result['lr']:g} (constant), FSDP 2 on 2 CPU ranks, "
                 f"{result['regime']['note']}")
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
    parser.add_argument("--regime", choices=[*REGIMES, "all"], default="all")
    parser.add_argument("--steps", type=int, help="instead of the regime's")
    parser.add_argument("--lr", type=float, help="instead of the regime's Muon lr")
    parser.add_argument("--tau", type=float, help="instead of the regime's τ")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plots", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.cost_only:
        for name in REGIMES if args.regime == "all" else [args.regime]:
            overrides = {k: getattr(args, k) for k in ("steps", "lr", "tau") if getattr(args, k) is not None}
            result = run_training(dataclasses.replace(REGIMES[name], **overrides))
            suffix = "" if name == "high_lr" else f"_{name}"
            (args.out / f"qk_clip{suffix}.json").write_text(json.dumps(result, indent=1))
            plot(result, args.plots / f"qk_clip{suffix}.png")
            print(name, json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if not args.train_only:
        cost = measure_cost()
        (args.out / "qk_clip_cost.json").write_text(json.dumps(cost, indent=1))
        print(json.dumps(cost, indent=1))


if __name__ == "__main__":
    main()
