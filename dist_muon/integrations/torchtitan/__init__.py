"""DistMuon as a torchtitan 0.2.2 optimizer: ``[optimizer] name = "DistMuon"``.

* ``config``: the ``[optimizer]`` fields (``job.custom_config_module`` target) and their validation;
* ``builder``: one DistMuon per model part through torchtitan's optimizer builders, and LR
  schedulers that resume every param group with its own lr;
* ``train_spec``: registering the builders in train specs; ``DistMuonTrainer``.

``launch/train.py`` wires all of this up. With torchtitan's own entry point use
``--job.custom_config_module dist_muon.integrations.torchtitan.config
--experimental.custom_import dist_muon.integrations.torchtitan.autoregister``.
"""

from .builder import (
    DistMuonOptimizersContainer,
    PerGroupLRSchedulersContainer,
    build_dist_muon_optimizers,
)
from .config import NAME, ConfigError, DistMuonOptimizer, distmuon_kwargs, parse_rules, validate
from .train_spec import DistMuonTrainer, add_config_module, register, register_all, with_dist_muon

__all__ = [
    "NAME",
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
