"""Scaling plot from the benchmark JSONs: optimizer-step time vs world size, one line per implementation.

    python -m benchmarks.plot                      # docs/benchmark_results/w<W>.json -> docs/benchmarks_scaling.png
    python -m benchmarks.plot --results DIR --out PNG
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(results_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(results_dir, "w[0-9]*.json")))
    runs = [json.load(open(p)) for p in paths if "_" not in os.path.basename(p)]  # w4_bf16.json: another dtype
    return sorted(runs, key=lambda r: r["world_size"])


def plot(runs: list[dict], out: str) -> None:
    names = []
    for r in runs:
        for n in r["seconds"]:
            if n not in names:
                names.append(n)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, n in enumerate(names):
        pts = [(r["world_size"], r["seconds"][n]) for r in runs if n in r["seconds"]]
        if not pts:
            continue
        xs, ys = zip(*pts)
        style = dict(marker="o", linewidth=2.5 if n == "dist_muon" else 1.2, color=f"C{i}")  # same colour in both panels
        if n == "torch_muon_single":
            style.update(linestyle="--")
        ax.plot(xs, ys, label=n, **style)
        if n != "dist_muon" and all("dist_muon" in r["seconds"] for r in runs):
            ratio = [(r["world_size"], r["seconds"][n] / r["seconds"]["dist_muon"]) for r in runs if n in r["seconds"]]
            ax2.plot(*zip(*ratio), label=n, **style)
    ws = [r["world_size"] for r in runs]
    for a in (ax, ax2):
        a.set_xticks(ws)
        a.set_xlabel("world size W (processes)")
        a.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("median optimizer step (s), log scale")
    ax.set_title(f"step time, model '{runs[0]['model']}'")
    ax2.axhline(1.0, color="k", linewidth=0.8)
    ax2.set_ylabel("time / dist_muon time")
    ax2.set_title("relative to dist_muon (>1: dist_muon faster)")
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8)
    m = runs[0].get("machine", {})
    fig.suptitle(f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores, torch {m.get('torch', '?')}, "
                 f"1 thread/process, gloo" + ("" if not m.get("cuda") else " (CUDA)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="docs/benchmark_results")
    ap.add_argument("--out", default="docs/benchmarks_scaling.png")
    args = ap.parse_args(argv)
    runs = load(args.results)
    if not runs:
        raise SystemExit(f"no w*.json in {args.results}; run python -m benchmarks.run --json ... first")
    plot(runs, args.out)
    print(f"wrote {args.out} from {[r['world_size'] for r in runs]}")


if __name__ == "__main__":
    main()
