"""(temporary; helper-3 writes the real one)"""
import importlib.metadata
SUPPORTED = ("0.2.2", "0.3.0")
def torchtitan_version():
    return tuple(int(x) for x in importlib.metadata.version("torchtitan").split(".")[:3])
def require_supported():
    v = torchtitan_version()
    if v[:2] not in ((0, 2), (0, 3)):
        raise ImportError(f"torchtitan {v} unsupported; supported: {SUPPORTED}")
    return v
