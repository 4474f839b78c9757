"""Importing this module registers DistMuon in every torchtitan model's train spec.

For torchtitan's own entry point: ``--experimental.custom_import
dist_muon.integrations.torchtitan.autoregister`` (imported by the Trainer before
it looks up the train spec).
"""

from .train_spec import register_all

register_all()
