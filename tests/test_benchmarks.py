"""Smoke test of the benchmark harness (correctness of the harness, not speed: no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    # --eager-peers: the peers' torch.compile'd NS loops run eagerly so no inductor build happens here.
    cmd = [sys.executable, "-m", "benchmarks.run", "--world-size", "2", "--model", "tiny", "--json", str(out),
           "--steps", "1", "--warmup", "1", "--eager-peers", "--collective-timeout", "60"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())

    assert data["world_size"] == 2
    for key in ("seconds", "imbalance", "extra_mem_bytes", "bucket_bytes", "rel_error", "status"):
        assert key in data, key
    for name in ("dist_muon", "naive", "torch_muon_single", "adamw"):
        assert data["status"][name] == "ok", (name, data["status"][name], data.get("tracebacks"))
        assert data["seconds"][name] > 0
    # every implementation either ran or says why it did not
    for name, status in data["status"].items():
        assert status == "ok" or status.startswith("skipped: ") or status.startswith("failed: "), (name, status)
        if status == "ok":
            assert name in data["seconds"]
    assert data["status"]["torchtitan_muon"].startswith("skipped: ") or data["status"]["torchtitan_muon"] == "ok"
    # the installed PyPI peers must run (they are test dependencies of the benchmark)
    for peer, module in (("muon_fsdp2", "muon_fsdp2"), ("dtensor_muon", "dtensor_muon")):
        try:
            __import__(module)
        except ImportError:
            continue
        assert data["status"][peer] == "ok", (peer, data["status"][peer], data.get("tracebacks"))

    # every update that ran matches torch.optim.Muon on full tensors (bf16 NS: rounding-level differences)
    for name, err in data["rel_error"].items():
        if name == "adamw":
            assert err is None
            continue
        assert err is not None and err < 5e-2, (name, err)
    assert data["rel_error"]["torch_muon_single"] == 0.0

    assert 1.0 <= data["imbalance"] < 1.5
    assert 0 < data["extra_mem_bytes"] <= data["bucket_bytes"] + data["largest_matrix_bytes"]
