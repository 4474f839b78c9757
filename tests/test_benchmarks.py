"""Smoke test of the benchmark harness (correctness of the harness, not speed: no timing asserts)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from harness import COLLECTIVE_TIMEOUT, TEST_TIMEOUT, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke(launcher, tmp_path):
    out = tmp_path / "bench.json"
    # --eager-peers: the peers' torch.compile'd NS loops run eagerly so no inductor build happens here.
    cmd = [sys.executable, "-m", "benchmarks.run", "--world-size", "2", "--model", "tiny", "--json", str(out),
           "--steps", "1", "--warmup", "1", "--eager-peers", "--collective-timeout", str(COLLECTIVE_TIMEOUT),
           "--timeout", str(TEST_TIMEOUT)]
    rc, log = launcher.start(cmd, tmp_path / "bench.log", env=dict(os.environ), name="benchmark").wait()
    assert rc == 0, log[-6000:]
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

    # NS dtype "auto": never bf16 matmuls on CPU (~10x slower there)
    cuda = torch.cuda.is_available()
    assert data["settings"]["ns"].endswith("bfloat16" if cuda else "float32"), data["settings"]["ns"]
    # every update that ran matches torch.optim.Muon on full tensors: rounding-level differences, which
    # in float32 are far below bf16's ~1e-2
    ours = ("dist_muon", "naive")
    for name, err in data["rel_error"].items():
        if name == "adamw":
            assert err is None
            continue
        assert err is not None and err < (5e-2 if cuda or name not in ours else 1e-4), (name, err)
    assert data["rel_error"]["torch_muon_single"] == 0.0

    assert 1.0 <= data["imbalance"] < 1.5
    assert 0 < data["extra_mem_bytes"] <= data["bucket_bytes"] + data["largest_matrix_bytes"]


def test_builtin_distmuon_probes_smoke(launcher, tmp_path):
    """benchmarks/builtin_distmuon.py's feature probes on 2 CPU ranks in the torchtitan 0.3.0 environment
    (~15 s): ours exact on every row, every built-in outcome recorded, and its device check bypassed so that its
    layout validation runs. Asserts the harness, not the built-in's feature set beyond what the bypass keys on."""
    if not os.environ.get("DIST_MUON_TT030_ENV") and not os.path.exists(
            os.path.join(REPO, "launch", "torchtitan030_env.py")):
        pytest.skip("no torchtitan 0.3.0 environment: set DIST_MUON_TT030_ENV to a `pip install --no-deps --target` "
                    "directory of torchtitan 0.3.0 (or add launch/torchtitan030_env.py)")
    out = tmp_path / "builtin.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "benchmarks.builtin_distmuon", "--no-bench",
           "--json", str(out), "--collective-timeout", str(COLLECTIVE_TIMEOUT)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rc, log = launcher.start(cmd, tmp_path / "builtin.log", env=env, name="builtin_distmuon").wait()
    assert rc == 0, log[-6000:]
    data = json.loads(out.read_text())
    assert data["torchtitan"].startswith("0.3."), data["torchtitan"]

    ran = [r for r in data["probes"] if "skipped" not in r]
    assert len(ran) >= 10, [r["key"] for r in data["probes"]]
    for row in ran:
        # ours: one step equals the fp64 reference on every layout
        assert row["ours"]["status"] == "exact", (row["key"], row["ours"])
        assert row["ours"]["max_rel_error"] <= 1e-5, (row["key"], row["ours"])
        assert row["builtin"]["status"] in ("constructed", "refused"), (row["key"], row["builtin"])
        assert row["builtin_step"]["status"] in ("ran", "ran, device check bypassed", "skipped", "n/a"), row
    if not torch.cuda.is_available():
        # the bypass keys on this message: if it changed, the layout validation would silently not run
        cpu = next(r for r in ran if r["key"] == "cpu")
        assert "requires one CUDA device per process" in cpu["builtin"]["message"], cpu["builtin"]
        bypassed = [r["builtin_device_check_bypassed"] for r in ran if r["builtin_device_check_bypassed"]]
        assert bypassed and all(b["status"] in ("accepted", "constructed", "refused") for b in bypassed), bypassed
        assert not any("CUDA device per process" in b.get("message", "") for b in bypassed), bypassed
        assert data["step_benchmark"] == "not run (--no-bench)"
