"""A cached directory holding torchtitan 0.3.0, for running it next to the main environment's 0.2.2.

torchtitan 0.2.2 (the main environment's, TOML configs) and 0.3.0 (Python config registries)
cannot share one site-packages. 0.3.0 and the few packages it needs beyond the main environment
are installed with ``pip install --no-deps --target DIR``; putting DIR first on PYTHONPATH (and the
repo root after it) runs 0.3.0 with everything else (torch, tyro, datasets, tokenizers, ...) taken
from the main environment::

    PYTHONPATH=$(python -m launch.torchtitan030_env --pythonpath) torchrun ... -m launch.train --module llama3 ...

``--no-deps`` is what keeps pip from resolving (and downloading) another torch: 0.3.0 pins torch
2.14 while the main environment's 2.13 is the one that runs it.

The directory lives under ``$DIST_MUON_CACHE`` (default ``~/.cache/dist_muon``), named after the
Python version and the pinned list below, so changing either builds a new one. It is built in a
temporary directory and renamed into place when complete, under a file lock: concurrent callers
(pytest workers, several jobs) wait for one build and then share it; a crashed build leaves only a
temporary directory, removed by the next build.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Everything torchtitan 0.3.0 needs that the main environment (constraints.txt, pyproject's
# [torchtitan,dev] extras) does not have. Its other requirements are already there and work in the
# versions installed: tyro, tokenizers, torchdata, einops, pillow, tensorboard, and datasets 5.x
# although 0.3.0 asks for <4.8 (only the local-JSON ``c4_test`` path is used, and it loads).
# Left out on purpose: safetensors and wandb, imported only lazily on paths we do not run
# (HF-format checkpoints, wandb logging).
PACKAGES = (
    "torchtitan==0.3.0",
    # torchtitan 0.3.0 pins it exactly; protocols/module.py imports it at module level (the
    # spmd_types backend's per-tensor sharding annotations).
    "spmd_types==0.2.3",
    # torchtitan 0.3.0's CheckpointManager saves and loads through it (components/checkpointer).
    "torch_checkpointing==0.1.1",
)
FORMAT = 1  # bump when the directory's layout or how it is built changes
_COMPLETE = ".dist_muon_complete"  # written last, before the rename: a directory without it is not ours


def cache_root() -> Path:
    return Path(os.environ.get("DIST_MUON_CACHE") or Path.home() / ".cache" / "dist_muon")


def env_key(packages: tuple[str, ...] = PACKAGES) -> str:
    """Directory name: the Python version (``--target`` installs are per interpreter) and a hash of the pins."""
    digest = hashlib.sha256("\n".join([str(FORMAT), sys.implementation.cache_tag, *sorted(packages)]).encode())
    return f"torchtitan030-{sys.implementation.cache_tag}-{digest.hexdigest()[:12]}"


def ensure_env(packages: tuple[str, ...] = PACKAGES, *, quiet: bool = True) -> Path:
    """The directory with ``packages`` installed, built on first use and reused afterwards."""
    if sys.version_info < (3, 11):
        raise RuntimeError(f"torchtitan 0.3.0 needs Python >= 3.11; this is {sys.version.split()[0]}")
    root = cache_root()
    final = root / env_key(packages)
    if (final / _COMPLETE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (final / _COMPLETE).is_file():  # another process built it while we waited
            return final
        for stale in root.glob(f"{final.name}.tmp-*"):  # left by a build that died (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # not made by this builder (no marker): do not trust it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            _install(packages, tmp, quiet=quiet)
            (tmp / _COMPLETE).write_text("\n".join(packages) + "\n")
            os.rename(tmp, final)  # atomic: readers see no directory or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _install(packages: tuple[str, ...], target: Path, *, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:", "--no-input",
           "--disable-pip-version-check", "--target", str(target), *packages]
    if quiet:
        cmd.append("--quiet")
    start = time.monotonic()
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the torchtitan 0.3.0 environment failed: {' '.join(cmd)}\n{result.stdout}")
    installed = {d.metadata["Name"].lower().replace("-", "_"): d.version
                 for d in importlib.metadata.distributions(path=[str(target)])}
    wanted = dict(p.lower().replace("-", "_").split("==") for p in packages)
    if installed != wanted:  # e.g. a dependency slipped in: it would shadow the main environment's
        raise RuntimeError(f"{target} holds {installed}, expected exactly {wanted}")
    print(f"built the torchtitan 0.3.0 environment {target.name} in {time.monotonic() - start:.1f}s",
          file=sys.stderr)


def pythonpath(env_dir: Path | None = None) -> str:
    """PYTHONPATH for running torchtitan 0.3.0 with this repo: the environment first, then the repo root."""
    parts = [str(env_dir or ensure_env()), str(REPO)]
    return os.pathsep.join(parts)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--pythonpath"]):
        raise SystemExit("usage: python -m launch.torchtitan030_env [--pythonpath]")
    env_dir = ensure_env(quiet=False)
    print(pythonpath(env_dir) if argv else env_dir)


if __name__ == "__main__":
    main()
