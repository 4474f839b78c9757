"""torchtitan 0.3.0: every parallel layout it produces, per ``spmd_backend``, is exact or refused.

Each case builds one of our debug configs' models exactly as torchtitan's Trainer does (its
ParallelDims, ``set_spmd_backend``, ``update_from_config``, the model spec's ``parallelize_fn`` or
``pipelining_fn``, ``init_weights``) on gloo ranks, gives every parameter the same seeded full
gradient in its own layout, and takes one DistMuonContainer step (float32 Newton–Schulz). The
reference is the same container on the unparallelized model holding the same full tensors, on every
rank. Updates (p_after − p_before) are compared relative to the reference update, Muon momentum and
AdamW moments relative to themselves: ≤ 1e-5.

``spmd_types`` keeps parameters as plain local shards; with torch 2.13 torchtitan's FSDP setup
refuses them on more than one rank, and DistMuonTrainer.Config refuses the combination at parse time
with a message saying what to use (tested here); on one rank every layout is whole and exact.
"""

from __future__ import annotations

import tempfile

import pytest
import torch

from harness import DistributedPool

BACKENDS = ("full_dtensor", "partial_dtensor")
LLAMA, MOE = "llama3_debug_cpu", "moe_debug_cpu"
RTOL = 1e-5
HYPER = dict(lr=0.05, weight_decay=0.1, adamw_lr=0.01, ns_dtype="float32", log_routing=False)


def _build(config, parallel_dims):
    """The model parts of ``config`` on ``parallel_dims``, as torchtitan's Trainer.__init__ builds them."""
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.tools import utils as tt_utils

    model_spec = config.model_spec
    model_config = model_spec.model
    model_config.update_from_config(config=config)
    with torch.device("meta"), tt_utils.set_default_dtype(TORCH_DTYPE_MAP[config.training.dtype]):
        model = model_config.build()
    kwargs = dict(parallel_dims=parallel_dims, training=config.training, parallelism=config.parallelism,
                  compile_config=config.compile, ac_config=config.activation_checkpoint,
                  dump_folder=tempfile.gettempdir())
    if parallel_dims.pp_enabled:
        loss_fn = config.loss.build(compile_config=config.compile)
        _, parts, _, _ = model_spec.pipelining_fn(model, device=torch.device("cpu"), model_config=model_config,
                                                  parallelize_fn=model_spec.parallelize_fn, loss_fn=loss_fn, **kwargs)
    else:
        parts = [model_spec.parallelize_fn(model, **kwargs)]
    for part in parts:
        part.to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            part.init_weights(buffer_device=None)
    return parts


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _gradient(name: str, like: torch.Tensor) -> torch.Tensor:
    """A seeded full gradient for parameter ``name``, laid out like ``like`` (DTensor or plain)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    seed = sum(map(ord, name))
    full = torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements)
    return full


def _state_of(optimizers) -> dict[str, torch.Tensor]:
    """(fqn.key) -> whole state tensor, over every DistMuon of the container."""
    out = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                for key, value in opt.state[p].items():
                    if isinstance(value, torch.Tensor) and value.ndim:
                        out[f"{name}.{key}"] = _full(value)
    return out


def step_errors(config_name: str, backend: str, parallelism: dict) -> dict:
    """One DistMuonContainer step on ``config_name``'s model in a layout, against the unparallelized step."""
    from launch import cpu_shims_030

    if cpu_shims_030.cpu_shims_needed():
        cpu_shims_030.activate()
    import torch.distributed as dist
    from dist_muon import canonical_fqn
    from dist_muon.integrations.torchtitan import DistMuonContainer, config_registry
    from torchtitan.config import ParallelismConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils

    def config():
        c = getattr(config_registry, config_name)()
        c.model_spec.model.layers = c.model_spec.model.layers[:2]
        c.parallelism = ParallelismConfig(spmd_backend=backend, **parallelism)
        return c

    distributed = config()
    parallel_dims = ParallelDims.from_config(distributed.parallelism, dist.get_world_size())
    dist_utils.set_spmd_backend(backend)
    parts = _build(distributed, parallel_dims)
    named = {canonical_fqn(n): p for part in parts for n, p in part.named_parameters()}
    before = {n: _full(p) for n, p in named.items()}
    opts = DistMuonContainer.Config(**HYPER).build(model_parts=parts)
    for n, p in named.items():
        p.grad = _gradient(n, p)
    opts.step()
    after = {n: _full(p) for n, p in named.items()}
    state = _state_of(opts.optimizers)

    # The reference: the same container on the whole model (plain tensors: one process each).
    single = config()
    single.parallelism = ParallelismConfig(spmd_backend=backend)
    model = single.model_spec.model.build()
    reference = {canonical_fqn(n): p for n, p in model.named_parameters() if canonical_fqn(n) in named}
    with torch.no_grad():
        for n, p in reference.items():
            p.copy_(before[n])
    ref_opts = DistMuonContainer.Config(**HYPER).build(model_parts=[model])
    for n, p in model.named_parameters():
        p.grad = _gradient(canonical_fqn(n), p) if canonical_fqn(n) in named else None
    ref_opts.step()
    ref_state = _state_of(ref_opts.optimizers)

    errors = {}
    for n, p in reference.items():
        expected = p.detach() - before[n]
        assert expected.norm() > 0, f"{n} did not move: the comparison would prove nothing"
        errors[n] = float((after[n] - before[n] - expected).norm() / expected.norm().clamp_min(1e-30))
    for key, value in state.items():
        errors[key] = float((value - ref_state[key]).norm() / ref_state[key].norm().clamp_min(1e-30))
    missing = sorted(set(reference) - set(named))
    assert not missing, missing
    return {"errors": errors, "placements": sorted({_placements(p) for p in named.values()})}


def _placements(p) -> str:
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return "plain"
    return f"{p.device_mesh.mesh_dim_names}:{tuple(str(x) for x in p.placements)}"


def _check(results) -> dict:
    worst: dict[str, float] = {}
    for r in results:
        for k, v in r["errors"].items():
            worst[k] = max(worst.get(k, 0.0), v)
    bad = {k: v for k, v in worst.items() if not v <= RTOL}
    assert not bad, f"differs from the single-process step: {dict(sorted(bad.items())[:10])}"
    return worst


# name -> (config, parallelism options)
LAYOUTS = {
    "fsdp2": (LLAMA, dict(data_parallel_shard_degree=2)),
    "tp2": (LLAMA, dict(data_parallel_shard_degree=1, tensor_parallel_degree=2)),
    "ddp2": (LLAMA, dict(data_parallel_replicate_degree=2, data_parallel_shard_degree=1)),
    "pp2": (LLAMA, dict(data_parallel_shard_degree=1, pipeline_parallel_degree=2,
                        pipeline_parallel_microbatch_size=1)),
    "fsdp2_ep2": (MOE, dict(data_parallel_shard_degree=2, expert_parallel_degree=2)),
    "fsdp2_ep1": (MOE, dict(data_parallel_shard_degree=2, expert_parallel_degree=1)),
    "hsdp_2x2": (LLAMA, dict(data_parallel_replicate_degree=2, data_parallel_shard_degree=2)),
    "fsdp2_tp2": (LLAMA, dict(data_parallel_shard_degree=2, tensor_parallel_degree=2)),
    "fsdp4_ep2_efsdp2": (MOE, dict(data_parallel_shard_degree=4, expert_parallel_degree=2)),
}
# torchtitan builds its meshes once per process (one Trainer per process). In a process that already
# built a full_dtensor MoE, or that builds one after another model, the experts' storage mesh comes
# out as another object than the one passed to fully_shard ("Expected param's DTensor mesh to be the
# same mesh passed to fully_shard"): a test-process artefact. Those cases get ranks of their own.
TWO = [(layout, backend) for layout in ("fsdp2", "tp2", "ddp2", "pp2", "fsdp2_ep2", "fsdp2_ep1") for backend in BACKENDS]
FOUR = [(layout, backend) for layout in ("hsdp_2x2", "fsdp2_tp2", "fsdp4_ep2_efsdp2") for backend in BACKENDS]
FRESH = {(layout, "full_dtensor") for layout, (config, _) in LAYOUTS.items() if config == MOE}


def run_case(pool, layout: str, backend: str) -> list:
    config, parallelism = LAYOUTS[layout]
    if (layout, backend) not in FRESH:
        return pool.run(step_errors, config, backend, parallelism)
    fresh = DistributedPool(pool.world)
    try:
        return fresh.run(step_errors, config, backend, parallelism)
    finally:
        fresh.close()


def _report(layout: str, backend: str, results) -> None:
    worst = _check(results)
    print(f"\n{backend} {layout}: max error {max(worst.values()):.2g}; placements {results[0]['placements']}")


@pytest.mark.parametrize("layout, backend", TWO)
def test_two_rank_layouts_equal_the_single_process_step(pool2, layout, backend):
    _report(layout, backend, run_case(pool2, layout, backend))


@pytest.mark.parametrize("layout, backend", FOUR)
def test_four_rank_layouts_equal_the_single_process_step(pool4, layout, backend):
    _report(layout, backend, run_case(pool4, layout, backend))
