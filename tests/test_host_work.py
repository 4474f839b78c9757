"""Host work, syncs and memory of a step, measured from the outside (benchmarks.measure).

Deterministic counts only: dispatched aten ops (each at least one kernel launch on a GPU), the
schedule's copy records, and allocator-measured memory. No timing.
"""

import contextlib

import pytest
import torch
from torch import nn

import dist_muon as dm
from benchmarks.measure import count_ops, peak_transient_bytes


def tiny_params(n: int, shape=(32, 64), seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*shape, generator=g)) for _ in range(n)]


def warm_optimizer(params, **kwargs):
    """An optimizer after one step (plan, views and caches made), with fresh gradients set."""
    opt = dm.DistMuon([{"params": params, "algorithm": "muon"}], lr=0.02, weight_decay=0.1, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return opt


def ops_per_step(n: int) -> int:
    return count_ops(warm_optimizer(tiny_params(n)).step).total


def test_ops_per_step_do_not_grow_with_the_number_of_matrices():
    few, many = ops_per_step(64), ops_per_step(1024)
    assert many <= 1.5 * few, f"{few} ops for 64 matrices but {many} for 1024"


def test_consecutive_matrices_of_one_parameter_move_as_one_copy():
    experts = nn.Parameter(torch.randn(64, 24, 16))
    opt = warm_optimizer([experts])
    (bucket,) = opt._runner.schedules
    assert len(bucket.forward) == 1 and len(bucket.apply_local) == 1, (bucket.forward, bucket.apply_local)
    assert bucket.forward[0].dst.shape == (64, 24, 16)  # straight from the whole gradient into the stack


def _fsdp_ops(n: int) -> int:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    module = nn.Module()
    for i, p in enumerate(tiny_params(n)):
        module.register_parameter(f"w{i}", p)
    fully_shard(module, mesh=init_device_mesh("cpu", (2,)))
    return count_ops(warm_optimizer(list(module.parameters())).step).total


def test_ops_per_step_do_not_grow_with_the_number_of_matrices_under_fsdp(pool2):
    few = pool2.run(_fsdp_ops, 64)
    many = pool2.run(_fsdp_ops, 1024)
    for f, m in zip(few, many):
        assert m <= 1.5 * f, f"{f} ops for 64 matrices but {m} for 1024"


def mixed_params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 128)] * 8 + [(128, 64)] * 8 + [(4, 96, 32)] * 2 + [(96, 96)] * 4
    return [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _peak_and_bound(params, budget_fraction: float):
    """Peak transient bytes of a warm step, and the bound 1.5 × budget + the largest matrix."""
    model_bytes = sum(comm_numel(p) * 4 for p in params)
    opt = warm_optimizer(params, bucket_bytes=int(model_bytes * budget_fraction), ns_dtype=torch.float32)
    assert len(opt.plan.buckets) > 2, "the budget must be smaller than the model"
    largest = max(m.nbytes for m in opt.plan.matrices)
    return peak_transient_bytes(opt.step), 1.5 * opt.bucket_bytes + largest


def comm_numel(p) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_peak_transient_memory_stays_within_the_bucket_budget(fraction):
    peak, bound = _peak_and_bound(mixed_params(), fraction)
    assert 0 < peak <= bound, (peak, bound)


def _fsdp_peak(fraction: float):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    module = nn.Module()
    for i, p in enumerate(mixed_params()):
        module.register_parameter(f"w{i}", p)
    fully_shard(module, mesh=init_device_mesh("cpu", (2,)))
    return _peak_and_bound(list(module.parameters()), fraction)


def test_peak_transient_memory_stays_within_the_bucket_budget_under_fsdp(pool2):
    for peak, bound in pool2.run(_fsdp_peak, 0.5):
        assert 0 < peak <= bound, (peak, bound)


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def counted_host_syncs():
    """Any host sync raises (``set_sync_debug_mode("error")``) but those of ``Tensor.tolist``, which
    are counted: the step's one allowed sync is the agreement vector the host reads back.
    Yields the list of the tolist calls' devices."""
    syncs = []
    original = torch.Tensor.tolist

    def counted(self):
        syncs.append(self.device)
        torch.cuda.set_sync_debug_mode(0)
        try:
            return original(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    torch.cuda.synchronize()
    torch.Tensor.tolist = counted
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield syncs
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.Tensor.tolist = original


@cuda
def test_a_warm_cuda_step_syncs_the_host_at_most_once():
    params = [nn.Parameter(p.detach().cuda()) for p in mixed_params()]
    opt = dm.DistMuon([{"params": params, "algorithm": "muon"}], lr=0.02, weight_decay=0.1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    with counted_host_syncs() as syncs:
        opt.step()
    assert len(syncs) == 1


@cuda
def test_the_cuda_step_matches_the_cpu_step():
    cpu = mixed_params()
    gpu = [nn.Parameter(p.detach().cuda()) for p in cpu]
    kwargs = dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, bucket_bytes=1 << 16)
    opts = [dm.DistMuon([{"params": ps, "algorithm": "muon"}], **kwargs) for ps in (cpu, gpu)]
    torch.backends.cuda.matmul.allow_tf32 = False
    for step in range(3):
        for c, g in zip(cpu, gpu):
            c.grad = torch.randn(c.shape, generator=torch.Generator().manual_seed(step * 100 + c.numel()))
            g.grad = c.grad.cuda()
        for opt in opts:
            opt.step()
    for c, g in zip(cpu, gpu):
        assert torch.allclose(c.detach(), g.detach().cpu(), rtol=1e-4, atol=1e-6)
