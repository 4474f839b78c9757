"""Framework integrations. ``dist_muon.integrations.torchtitan``: the TOML ``[optimizer]`` plugin."""
