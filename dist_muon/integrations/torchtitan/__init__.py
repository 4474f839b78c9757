"""DistMuon as a torchtitan 0.2.2 optimizer: ``[optimizer] name = "DistMuon"``.

* ``config``: the ``[optimizer]`` fields (``job.custom_config_module`` target) and their validation;
* ``builder``: one DistMuon per model part through torchtitan's optimizer builders, and LR
  schedulers that resume every param group with its own lr;
* ``train_spec``: registering the builders in train specs; ``DistMuonTrainer``.

``launch/train.py`` wires all of this up. With torchtitan's own entry point use
``--job.custom_config_module dist_muon.integrations.torchtitan.config
--experimental.custom_import dist_muon.integrations.torchtitan.autoregister``.
"""

from .version import require_supported

VERSION = require_supported()

# The modules below use torchtitan 0.2.x's API; under 0.3.x this package exposes only VERSION
# (so that ``dist_muon.integrations.torchtitan.version`` imports with either release).
if VERSION[:2] == (0, 2):
    from .builder import (  # noqa: E402
        DistMuonOptimizersContainer,
        PerGroupLRSchedulersContainer,
        build_dist_muon_optimizers,
    )
    from .config import NAME, ConfigError, DistMuonOptimizer, distmuon_kwargs, parse_rules, validate  # noqa: E402
    from .train_spec import DistMuonTrainer, add_config_module, register, register_all, with_dist_muon  # noqa: E402

    __all__ = [
        "NAME",
        "VERSION",
        "ConfigError",
        "DistMuonOptimizer",
        "DistMuonOptimizersContainer",
        "DistMuonTrainer",
        "PerGroupLRSchedulersContainer",
        "add_config_module",
        "build_dist_muon_optimizers",
        "distmuon_kwargs",
        "parse_rules",
        "register",
        "register_all",
        "validate",
        "with_dist_muon",
    ]
else:
    __all__ = ["VERSION"]
