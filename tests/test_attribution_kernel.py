"""The fused attribution kernel (interpreted on CPU) against its PyTorch reference and a direct form."""
import pytest
import torch

from trelm_fast.kernels.attribution import (
    attribution_scores,
    attribution_scores_reference,
    attribution_scores_triton,
)


def _inputs(m, n, d, i, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(m, n, d, generator=g, dtype=dtype)
    weights = torch.rand(m, generator=g)
    w2 = torch.randn(d, i, generator=g, dtype=dtype)
    v = torch.randn(n, i, generator=g, dtype=dtype)
    return grads, weights, w2, v


def test_reference_matches_per_step_projection():
    grads, weights, w2, v = _inputs(4, 9, 13, 21)
    per_step = torch.stack([grads[k] @ w2 for k in range(4)])  # [m, N, I]: what the kernel avoids
    direct = (v * (weights[:, None, None] * per_step).sum(0)).sum(0)
    torch.testing.assert_close(attribution_scores_reference(grads, weights, w2, v), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 19, 37, 50), (1, 5, 16, 70), (5, 33, 20, 129)])
def test_kernel_matches_reference(shape):
    grads, weights, w2, v = _inputs(*shape, seed=sum(shape))
    ref = attribution_scores_reference(grads, weights, w2, v)
    out = attribution_scores_triton(grads, weights, w2, v)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_kernel_strided_inputs():
    grads, weights, w2, v = _inputs(2, 17, 24, 40, seed=7)
    w2_t = w2.t().contiguous().t()  # same values, column-major strides (as nn.Linear weight.T)
    grads_nc = grads.transpose(0, 1).contiguous().transpose(0, 1)
    ref = attribution_scores_reference(grads, weights, w2, v)
    torch.testing.assert_close(attribution_scores_triton(grads_nc, weights, w2_t, v), ref, rtol=1e-4, atol=1e-4)


def test_dispatch_and_shape_errors():
    grads, weights, w2, v = _inputs(2, 3, 16, 16)
    torch.testing.assert_close(attribution_scores(grads, weights, w2, v), attribution_scores_reference(grads, weights, w2, v))
    with pytest.raises(ValueError, match="inconsistent"):
        attribution_scores_reference(grads, weights[:1], w2, v)
    with pytest.raises(ValueError, match="expects"):
        attribution_scores_triton(grads[0], weights, w2, v)
