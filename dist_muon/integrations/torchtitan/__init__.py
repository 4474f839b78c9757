"""DistMuon in torchtitan: one package for torchtitan 0.2.2 and 0.3.0, chosen by the installed version.

Shared by both (no torchtitan API of either version):

* ``options``: DistMuon's optimizer fields, their validation (``ConfigError`` naming the field) and
  the DistMuon arguments;
* ``routing``: a model part's param groups, with the attention views torchtitan models need;
* ``resume``: checking a checkpoint against every DistMuon before anything is loaded;
* ``reporting``: what the trainers log per step.

torchtitan 0.2.2 (TOML, ``[optimizer] name = "DistMuon"``; ``launch/train.py`` wires it up):

* ``config``: the ``[optimizer]`` fields (``job.custom_config_module`` target);
* ``builder``: one DistMuon per model part through torchtitan's optimizer builders, and LR
  schedulers that resume every param group with its own lr;
* ``train_spec``: registering the builders in train specs; ``DistMuonTrainer``.
  With torchtitan's own entry point use ``--job.custom_config_module
  dist_muon.integrations.torchtitan.config --experimental.custom_import
  dist_muon.integrations.torchtitan.autoregister``.

torchtitan 0.3.0 (Python configs, ``--module dist_muon.integrations.torchtitan --config <name>``):

* ``container``: ``DistMuonContainer``, an ``OptimizersContainer`` whose ``Config`` carries every option;
* ``trainer``: ``DistMuonTrainer`` (pre-load checkpoint validation, per-step DistMuon log lines);
* ``config_registry``: our configs (CPU debug models, Llama-3 8B, DeepSeek-V3 MoE);
* ``override``: the ``@override`` that puts DistMuon into any stock config.
"""

from .version import require_supported

VERSION = require_supported()

from .options import NAME, ConfigError, parse_rules  # noqa: E402

if VERSION[:2] == (0, 2):
    from .builder import (  # noqa: E402
        DistMuonOptimizersContainer,
        PerGroupLRSchedulersContainer,
        build_dist_muon_optimizers,
    )
    from .config import DistMuonOptimizer, distmuon_kwargs, validate  # noqa: E402
    from .train_spec import DistMuonTrainer, add_config_module, register, register_all, with_dist_muon  # noqa: E402

    __all__ = [
        "NAME", "VERSION", "ConfigError", "DistMuonOptimizer", "DistMuonOptimizersContainer", "DistMuonTrainer",
        "PerGroupLRSchedulersContainer", "add_config_module", "build_dist_muon_optimizers", "distmuon_kwargs",
        "parse_rules", "register", "register_all", "validate", "with_dist_muon",
    ]
else:
    from .container import DistMuonContainer, validate  # noqa: E402
    from .trainer import DistMuonTrainer  # noqa: E402

    __all__ = ["NAME", "VERSION", "ConfigError", "DistMuonContainer", "DistMuonTrainer", "parse_rules", "validate"]
