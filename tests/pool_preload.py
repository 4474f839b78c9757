"""What DistributedPool's workers import, imported once in multiprocessing's fork server (harness.py).

Only modules whose import has no side effect a test could depend on. torchtitan is preloaded only
where every pool function that uses it activates the CPU shims first (tests/torchtitan030/: 0.3.0's
modules copy ``device_type`` at import, so the shims must come before them, as launch.train does);
the main environment's pool functions use torchtitan 0.2.2 without shims and import it themselves.
"""

import torch  # noqa: F401
import torch.distributed.checkpoint  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.tensor  # noqa: F401

import dist_muon  # noqa: F401
import harness  # noqa: F401
from launch import cpu_shims_030, train

try:
    _TORCHTITAN_030 = train.torchtitan_version()[:2] == (0, 3)
except Exception:  # noqa: BLE001 - no or another torchtitan: nothing more to preload
    _TORCHTITAN_030 = False
if _TORCHTITAN_030 and cpu_shims_030.cpu_shims_needed():
    cpu_shims_030.activate()
    import torchtitan.train  # noqa: F401

    import dist_muon.integrations.torchtitan  # noqa: F401
