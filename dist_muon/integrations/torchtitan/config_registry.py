"""torchtitan 0.3.0 configs trained with DistMuon.

    torchrun --nproc_per_node 8 -m torchtitan.train --module dist_muon.integrations.torchtitan --config llama3_8b
    torchrun --nproc_per_node 2 -m launch.train --module dist_muon.integrations.torchtitan --config llama3_debug_cpu

(``--module`` tries ``<module>.config_registry`` first, so the package name is enough; without a GPU
use ``launch.train``, which adds the CPU shims.) Every DistMuon option is a field of
``--optimizer``: e.g. ``--optimizer.lr 0.03 --optimizer.attention_view heads``.

Each config is torchtitan's own for that model with the optimizer swapped for DistMuon; nothing
here names a parameter: routing and layouts are inferred (docs/torchtitan.md). The ``*_cpu``
configs run on 2 CPU ranks from the repository root with the bundled ``assets/`` (nothing
downloads); the others are the real model sizes for GPUs.
"""

from __future__ import annotations

import dataclasses

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.config.override import derive
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.deepseek_v3 import config_registry as deepseek_v3
from torchtitan.models.llama3 import config_registry as llama3
from torchtitan.trainer import Trainer

from .container import DistMuonContainer
from .trainer import DistMuonTrainer

ASSETS = "assets"  # relative to the repository root, like the 0.2.2 TOML configs


def _with_dist_muon(stock: Trainer.Config, optimizer: DistMuonContainer.Config) -> DistMuonTrainer.Config:
    # Parameters are DTensors under "full_dtensor", so DistMuon reads every layout from placements.
    # torchtitan's default, "spmd_types", keeps plain local shards (FSDP2 of torch 2.14 turns them into
    # DTensors; torchtitan with torch 2.13 refuses them on > 1 rank): see layouts.py.
    stock.parallelism.spmd_backend = "full_dtensor"
    return derive(stock, DistMuonTrainer.Config, optimizer=optimizer)


def _on_cpu(config: DistMuonTrainer.Config, *, dump_folder: str, steps: int, parallelism: ParallelismConfig,
            local_batch_size: int) -> DistMuonTrainer.Config:
    """A tiny, offline run on CPU ranks: bundled tokenizer and data, no CUDA graphs, fp32."""
    config.hf_assets_path = f"{ASSETS}/tokenizer"
    config.dump_folder = dump_folder
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path=f"{ASSETS}/c4_tiny")
    config.training = TrainingConfig(local_batch_size=local_batch_size, seq_len=128, steps=steps, max_norm=1.0,
                                     mixed_precision_param="float32", disable_cuda_graphs=True)
    config.parallelism = dataclasses.replace(parallelism, spmd_backend="full_dtensor")
    config.checkpoint = CheckpointManager.Config(enable=True, interval=5, last_save_model_only=False)
    config.activation_checkpoint = None  # none: nothing to save on these sizes
    config.metrics = MetricsProcessor.Config(log_freq=1)
    config.validator.enable = False
    config.debug.seed = 0
    return config


# ----------------------------------------------------------------------------- CPU (2 ranks)


def llama3_debug_cpu() -> DistMuonTrainer.Config:
    """llama3 debugmodel (fused, interleaved wqkv: Q, K and V orthogonalized as three matrices),
    FSDP over 2 CPU ranks."""
    config = _with_dist_muon(llama3.llama3_debugmodel(),
                             DistMuonContainer.Config(lr=0.02, weight_decay=0.01, adamw_lr=0.004))
    return _on_cpu(config, dump_folder="./outputs/llama3_debug_cpu", steps=10, local_batch_size=4,
                   parallelism=ParallelismConfig(data_parallel_shard_degree=2))


def moe_debug_cpu() -> DistMuonTrainer.Config:
    """deepseek_v3 debugmodel's first two layers (one dense, one MoE with 8 routed experts [E, M, N],
    each orthogonalized as its own matrix; MLA attention), FSDP 2 with expert parallelism 2 on 2 CPU
    ranks. Two layers, because MLA's wkv_b alone is ~23 GFLOP of Newton–Schulz per layer and step."""
    config = _with_dist_muon(deepseek_v3.deepseek_v3_debugmodel(),
                             DistMuonContainer.Config(lr=0.02, weight_decay=0.01, adamw_lr=0.004))
    config.model_spec.model.layers = config.model_spec.model.layers[:2]
    return _on_cpu(config, dump_folder="./outputs/moe_debug_cpu", steps=6, local_batch_size=2,
                   parallelism=ParallelismConfig(data_parallel_shard_degree=2, expert_parallel_degree=2))


# ----------------------------------------------------------------------------- GPUs, real sizes


def llama3_8b() -> DistMuonTrainer.Config:
    """Llama-3.1-8B (torchtitan's llama3_8b: FSDP over all GPUs), DistMuon with Muon lr 0.02 and
    AdamW at torchtitan's 3e-4 for embeddings, head and norms."""
    return _with_dist_muon(llama3.llama3_8b(),
                           DistMuonContainer.Config(lr=0.02, weight_decay=0.1, adamw_lr=3e-4))


def deepseek_v3_16b() -> DistMuonTrainer.Config:
    """DeepSeek-V3 16B MoE (Moonlight-like: 64 routed experts, MLA; torchtitan's deepseek_v3_16b:
    EP 8, pipeline-parallel schedule ready), with the Moonlight recipe: AdamW-matched update RMS
    (``adjust_lr="match_rms_adamw"``), one lr for all."""
    return _with_dist_muon(deepseek_v3.deepseek_v3_16b(),
                           DistMuonContainer.Config(lr=2.2e-4, weight_decay=0.1, adjust_lr="match_rms_adamw"))


def deepseek_v3_671b() -> DistMuonTrainer.Config:
    """DeepSeek-V3 671B / Kimi-K2-like MoE (torchtitan's deepseek_v3_671b), Moonlight recipe."""
    return _with_dist_muon(deepseek_v3.deepseek_v3_671b(),
                           DistMuonContainer.Config(lr=2.2e-4, weight_decay=0.1, adjust_lr="match_rms_adamw"))
