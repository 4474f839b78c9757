"""On-disk cache of Triton tile choices, so each (device, dtype, shape) is tuned once per machine.

Tuning a new shape costs tens of seconds (compiling and timing every candidate tile). Without a
cache every process and every rank pays it again. Entries are keyed by triton version, device
name, dtype, kernel and the problem size (M, K); the value is a tile config. One JSON file per
device name lives in ``$DIST_MUON_CACHE_DIR`` (default ``~/.cache/dist_muon``);
``DIST_MUON_TRITON_CACHE=0`` turns the file off (tuning then happens once per process).

Several ranks may tune at the same time: writers merge under an ``fcntl`` lock and replace the
file atomically, so readers never see a partial file and no writer drops another's entries.
A file that cannot be parsed is ignored with a warning and rewritten by the next ``put``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: atomic replace only, concurrent puts may drop entries
    fcntl = None

DIR_ENV = "DIST_MUON_CACHE_DIR"
ENABLE_ENV = "DIST_MUON_TRITON_CACHE"
_FORMAT = 1  # bump when the value layout changes; older files are ignored


def cache_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or Path.home() / ".cache" / "dist_muon")


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") not in ("", "0")


def make_key(*, triton_version: str, device: str, dtype, kernel: str, M: int, K: int) -> str:
    dtype = str(dtype).removeprefix("torch.")
    return f"triton={triton_version}|device={device}|dtype={dtype}|kernel={kernel}|M={int(M)}|K={int(K)}"


class TuneCache:
    """The tile choices for one device, backed by ``<dir>/triton-<device>.json``."""

    def __init__(self, device: str, directory: "str | os.PathLike | None" = None):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_") or "device"
        self.path = Path(directory if directory is not None else cache_dir()) / f"triton-{slug}.json"
        self._entries: "dict | None" = None

    def _read(self) -> dict:
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("format") != _FORMAT or not isinstance(doc.get("entries"), dict):
                raise ValueError(f"not a format-{_FORMAT} dist_muon tuning cache")
            return doc["entries"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError
            warnings.warn(f"ignoring unreadable Triton tuning cache {self.path}: {e}", stacklevel=3)
            return {}

    def get(self, key: str) -> "dict | None":
        if self._entries is None:
            self._entries = self._read()
        return self._entries.get(key)

    def put(self, key: str, value: dict) -> None:
        """Add an entry. A cache that cannot be written (read-only home, full disk) only warns:
        losing the cache must never stop training."""
        entries = dict(self._entries or {})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                entries = self._read()  # re-read under the lock: another rank may have added entries
                entries[key] = value
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"format": _FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
        except OSError as e:
            entries[key] = value
            warnings.warn(f"could not write the Triton tuning cache {self.path}: {e}", stacklevel=2)
        self._entries = entries
