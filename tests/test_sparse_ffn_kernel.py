"""gathered_tn_matmul: Triton kernel (interpreted on CPU) vs PyTorch reference vs autograd."""
import pytest
import torch

from trelm_fast.kernels import kernel_backend, sparse_ffn
from trelm_fast.kernels.sparse_ffn import (column_slice_grad, gather_columns, gathered_tn_matmul,
                                           gathered_tn_matmul_reference, gathered_tn_matmul_triton)

T, D, I = 21, 19, 37


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _idx(k, seed=0, dtype=torch.int64):
    return torch.randperm(I, generator=torch.Generator().manual_seed(seed))[:k].sort().values.to(dtype)


@pytest.mark.parametrize("k", [1, 2, 16, 17, 33, I])
def test_rows_with_colsum_match_reference_and_autograd(k):
    """dW1[S] = dPre[:, S]^T X and db1[S] against the reference and dense autograd."""
    g, x, idx = _rand(T, I, seed=k), _rand(T, D, seed=k + 1), _idx(k, seed=k)
    out, sums = gathered_tn_matmul_triton(g, x, a_idx=idx, colsum=True)
    ref, ref_sums = gathered_tn_matmul_reference(g, x, a_idx=idx, colsum=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    w, b = torch.zeros(I, D, requires_grad=True), torch.zeros(I, requires_grad=True)
    (torch.nn.functional.linear(x, w, b) * g).sum().backward()
    torch.testing.assert_close(ref, w.grad[idx], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_sums, b.grad[idx], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 18, I])
def test_columns_gathered_or_pregathered(k):
    """dW2[:, S] = dY^T A[:, S]: gather inside the kernel or from a pre-gathered A_S."""
    dy, a, idx = _rand(T, D, seed=k), _rand(T, I, seed=k + 2), _idx(k, seed=k + 3)
    w = torch.zeros(D, I, requires_grad=True)
    (torch.nn.functional.linear(a, w) * dy).sum().backward()
    out, none = gathered_tn_matmul_triton(dy, a, b_idx=idx)
    assert none is None and out.shape == (D, k)
    torch.testing.assert_close(out, w.grad[:, idx], rtol=1e-5, atol=1e-5)
    out2, _ = gathered_tn_matmul_triton(dy, a.index_select(1, idx))
    torch.testing.assert_close(out2, w.grad[:, idx], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 18, I])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_gather_columns_equals_index_select(k, dtype):
    t = _rand(I, T, seed=k).t()                        # non-contiguous [T, I]
    idx = _idx(k, seed=k + 1, dtype=dtype)
    out = gather_columns(t, idx)
    assert out.shape == (T, k) and out.is_contiguous()
    assert torch.equal(out, t.index_select(1, idx))


@pytest.mark.parametrize("k", [1, 18, D, I])
def test_column_slice_grad_in_either_orientation(k):
    """|S| < d_out goes through the transposed product, |S| >= d_out through the direct one."""
    dy, a, idx = _rand(T, D, seed=k), _rand(T, I, seed=k + 5), _idx(k, seed=k + 6)
    w = torch.zeros(D, I, requires_grad=True)
    (torch.nn.functional.linear(a, w) * dy).sum().backward()
    out = column_slice_grad(dy, gather_columns(a, idx))
    assert out.shape == (D, k) and out.dtype == torch.float32
    torch.testing.assert_close(out, w.grad[:, idx], rtol=1e-5, atol=1e-5)


def test_strided_int32_and_low_precision_inputs():
    g = _rand(I, T, seed=3).t()                        # non-contiguous [T, I]
    x = _rand(T, 2 * D, seed=4)[:, ::2]                 # strided columns
    idx = _idx(9, seed=5, dtype=torch.int32)
    out, sums = gathered_tn_matmul_triton(g, x, a_idx=idx, colsum=True)
    ref, ref_sums = gathered_tn_matmul_reference(g, x, a_idx=idx, colsum=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    for dt in (torch.bfloat16, torch.float16):
        gl, xl = g.to(dt), x.to(dt)
        out, sums = gathered_tn_matmul_triton(gl, xl, a_idx=idx, colsum=True)
        ref, ref_sums = gathered_tn_matmul_reference(gl, xl, a_idx=idx, colsum=True)
        assert out.dtype == torch.float32 and sums.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sums, ref_sums, rtol=1e-4, atol=1e-4)


def test_empty_path_and_empty_tokens():
    out, sums = gathered_tn_matmul_triton(_rand(T, I), _rand(T, D), a_idx=torch.empty(0, dtype=torch.long),
                                          colsum=True)
    assert out.shape == (0, D) and sums.shape == (0,)
    out, sums = gathered_tn_matmul_triton(_rand(0, I), _rand(0, D), a_idx=_idx(3), colsum=True)
    assert out.shape == (3, D) and not out.any() and not sums.any()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same T"):
        gathered_tn_matmul(_rand(T, I), _rand(T + 1, D))
    with pytest.raises(ValueError, match="a_idx must be a 1-D int32/int64"):
        gathered_tn_matmul(_rand(T, I), _rand(T, D), a_idx=torch.tensor([1.0]))


def test_ffn_backward_through_the_kernel(monkeypatch):
    """The autograd Functions of trelm_fast.ffn with both slice products on the kernel."""
    import trelm_fast.ffn as ffn

    calls = []
    monkeypatch.setattr(sparse_ffn, "gathered_tn_matmul_triton",
                        lambda *a, **k: calls.append(1) or gathered_tn_matmul_triton(*a, **k))
    x, dy = _rand(3, 7, D, seed=8), _rand(3, 7, D, seed=9)
    w1, b1, w2, b2 = _rand(I, D, seed=10), _rand(I, seed=11), _rand(D, I, seed=12), _rand(D, seed=13)
    idx = _idx(11, seed=14)
    sl = ffn.FFNSlices(torch.zeros(11, D, requires_grad=True), torch.zeros(11, requires_grad=True),
                       torch.zeros(D, 11, requires_grad=True))
    with kernel_backend("triton"):
        (ffn.trelm_ffn(x, w1, b1, w2, b2, torch.nn.functional.gelu, idx, sl) * dy).sum().backward()
    assert len(calls) == 2  # dW1[S, :] with db1[S], and dW2[:, S]
    dense = [t.clone().requires_grad_() for t in (w1, b1, w2)]
    (ffn.trelm_ffn(x, *dense[:2], dense[2], b2, torch.nn.functional.gelu) * dy).sum().backward()
    torch.testing.assert_close(sl.w1.grad, dense[0].grad[idx], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.b1.grad, dense[1].grad[idx], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.w2.grad, dense[2].grad[:, idx], rtol=1e-5, atol=1e-5)
