import pytest
import torch

import dist_muon as dm
from reference import ns64


def _svals(O):
    return torch.linalg.svdvals(O.float())


@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256), (3, 256, 1024)])
def test_orthogonalization_quality_bf16(shape):
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    pe = _svals(dm.orthogonalize(X, method="polar_express"))
    qu = _svals(dm.orthogonalize(X, method="quintic"))
    assert pe.min() >= 0.8 and pe.max() <= 1.2, (pe.min(), pe.max())
    assert qu.min() >= 0.6 and qu.max() <= 1.25, (qu.min(), qu.max())


def test_polar_express_beats_quintic_on_ill_conditioned_input():
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    V, _ = torch.linalg.qr(torch.randn(512, 256, generator=g))
    s = torch.logspace(0, -3, 256)
    X = U @ torch.diag(s) @ V.T
    polar = U @ V.T
    err = {m: (dm.orthogonalize(X, method=m).float() - polar).norm() / polar.norm() for m in ("polar_express", "quintic")}
    assert err["polar_express"] < err["quintic"], err


@pytest.mark.parametrize("method", ["quintic", "polar_express"])
def test_fp32_matches_fp64_definition(method):
    X = torch.randn(48, 80, generator=torch.Generator().manual_seed(2))
    ours = dm.orthogonalize(X, method=method, dtype=torch.float32).double()
    ref = ns64(X, method)
    assert (ours - ref).norm() / ref.norm() < 1e-5


def test_tall_and_batched_equal_per_matrix_results():
    X = torch.randn(4, 40, 24, generator=torch.Generator().manual_seed(3))
    batched = dm.orthogonalize(X, dtype=torch.float32)
    for i in range(4):
        single = dm.orthogonalize(X[i], dtype=torch.float32)
        torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single, dm.orthogonalize(X[i].T, dtype=torch.float32).T, rtol=1e-5, atol=1e-6)


def test_custom_schedule_and_zero_input():
    X = torch.randn(16, 32)
    custom = dm.orthogonalize(X, method=[(3.4445, -4.7750, 2.0315)] * 5, steps=5, dtype=torch.float32)
    torch.testing.assert_close(custom, dm.orthogonalize(X, method="quintic", dtype=torch.float32), rtol=0, atol=1e-6)
    zeros = dm.orthogonalize(torch.zeros(2, 8, 16))
    assert torch.isfinite(zeros).all() and not zeros.abs().any()


def test_norm_is_taken_in_fp32():
    X = torch.full((8, 16), 1e3, dtype=torch.float16)  # ‖X‖ overflows fp16
    assert torch.isfinite(dm.orthogonalize(X, dtype=torch.float16)).all()


@pytest.mark.parametrize("bad", [dict(method="cubic"), dict(steps=0), dict(method=[(1.0, 2.0)]), dict(dtype=torch.int32)])
def test_bad_numerics_options_raise(bad):
    with pytest.raises(ValueError):
        dm.orthogonalize(torch.randn(4, 4), **bad)


def test_compiled_loop_matches_eager():
    import torch._dynamo

    X = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled = dm.numerics.orthogonalize_with(X, dm.numerics.resolve_schedule("polar_express", 5), torch.float32,
                                              compiled=True)
    torch.testing.assert_close(compiled, dm.orthogonalize(X, dtype=torch.float32), rtol=1e-5, atol=1e-6)
