"""Which torchtitan is installed, read from package metadata (importing torchtitan itself is slow and,
for the wrong version, fails in ways that do not name the version).

Two release lines are supported and differ completely in their configuration API: 0.2.x (TOML,
``JobConfig``; tested with 0.2.2) and 0.3.x (``--module/--config`` Python configs; tested with 0.3.0).
"""

from __future__ import annotations

import importlib.metadata
import re

SUPPORTED = ("0.2.2", "0.3.0")
_SERIES = {tuple(int(x) for x in v.split(".")[:2]) for v in SUPPORTED}


def torchtitan_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the installed torchtitan distribution (the first one on sys.path,
    so a ``pip install --target`` directory put first on PYTHONPATH wins over site-packages).

    Raises ImportError when torchtitan is not installed or its version cannot be read.
    """
    try:
        text = importlib.metadata.version("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"torchtitan is not installed; dist_muon supports torchtitan {' and '.join(SUPPORTED)}") from None
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ImportError(f"cannot read torchtitan's version {text!r}; dist_muon supports {' and '.join(SUPPORTED)}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def require_supported() -> tuple[int, int, int]:
    """The installed torchtitan's version, or ImportError naming the supported ones."""
    version = torchtitan_version()
    if version[:2] not in _SERIES:
        raise ImportError(f"torchtitan {'.'.join(map(str, version))} is not supported; dist_muon supports torchtitan "
                          f"{' and '.join(SUPPORTED)} (the 0.2.x and 0.3.x release lines)")
    return version
