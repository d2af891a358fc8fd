"""Gathered weight-gradient products of the sparse FFN backward (DESIGN.md section 2).

For T tokens, one product covers both slice gradients of a knowledge path S:

    out[m, n] = sum_t a[t, ia[m]] * b[t, ib[n]]        (ia = a_idx or arange, ib = b_idx or arange)
    colsum[m] = sum_t a[t, ia[m]]                       (optional)

- up projection rows:      dW1[S, :] = dPre[:, S]^T X  and  db1[S] = sum_t dPre[t, S]
  -> gathered_tn_matmul(dPre, X, a_idx=S, colsum=True)
- down projection columns: dW2[:, S] = dY^T A[:, S]
  -> gathered_tn_matmul(dY, A, b_idx=S), or column_slice_grad(dY, A_S) when A_S = A[:, S] was
     gathered in the forward (what TrelmFFN does: only |S| columns of A stay alive).

Only the [|S|, d] / [d, |S|] results are materialized, always in fp32 (fp32 accumulation of fp16/bf16
inputs). `gathered_tn_matmul_reference` is the plain PyTorch form (column gather + matmul; on CUDA
fp16/bf16 operands go to cuBLAS with an fp32 result); `gathered_tn_matmul_triton` is one Triton
kernel that gathers while loading, reduces over tokens and adds the column sums in the same pass.
`gathered_tn_matmul` takes the reference on every device and the kernel only inside
`kernel_backend("triton")`: on the H100 at 64 x 128 tokens gather + cuBLAS beat the kernel at every
path size, shape and dtype measured (docs/gpu.md: the kernel tiles only the small [|S|, d] output,
a few dozen programs each reducing all tokens, with no split over tokens). The kernel is autotuned on
the bucketed sizes (`_launch.bucket`: |S| and the token count change from batch to batch). Tests run
it on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import INTERPRET, autotune, bucket, index_arg, record_flops, use_triton

_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_T": 16}, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 32}, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_T": 32}, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_T": 32}, num_warps=8),
]


@autotune(_CONFIGS, key=["M_BUCKET", "N_BUCKET", "T_BUCKET", "GATHER_A", "GATHER_B", "COLSUM"])
@triton.jit
def _gathered_tn_matmul_kernel(
    a_ptr, b_ptr, ia_ptr, ib_ptr, out_ptr, colsum_ptr,
    M, N, T, M_BUCKET, N_BUCKET, T_BUCKET,  # *_BUCKET: autotune keys only
    stride_at, stride_ak, stride_bt, stride_bk, stride_om, stride_on,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, COLSUM: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i_m, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = o_m < M, o_n < N
    # source columns of a and b owned by this program (the gather happens here, while loading)
    if GATHER_A:
        c_a = tl.load(ia_ptr + o_m, mask=m_m, other=0)
    else:
        c_a = o_m
    if GATHER_B:
        c_b = tl.load(ib_ptr + o_n, mask=m_n, other=0)
    else:
        c_b = o_n
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        m_t = o_t < T
        b_a = tl.load(a_ptr + o_t[:, None] * stride_at + c_a[None, :] * stride_ak,
                      mask=m_t[:, None] & m_m[None, :], other=0.0)
        b_b = tl.load(b_ptr + o_t[:, None] * stride_bt + c_b[None, :] * stride_bk,
                      mask=m_t[:, None] & m_n[None, :], other=0.0)
        if IEEE:
            b_a = b_a.to(tl.float32)
            b_acc += tl.dot(tl.trans(b_a), b_b.to(tl.float32), input_precision="ieee")
        else:
            b_acc += tl.dot(tl.trans(b_a), b_b)
        if COLSUM:
            b_sum += tl.sum(b_a.to(tl.float32), axis=0)
    tl.store(out_ptr + o_m[:, None] * stride_om + o_n[None, :] * stride_on, b_acc,
             mask=m_m[:, None] & m_n[None, :])
    if COLSUM:
        if i_n == 0:
            tl.store(colsum_ptr + o_m, b_sum, mask=m_m)


def _check(a: Tensor, b: Tensor, a_idx: Tensor | None, b_idx: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Validate the operands; returns (a_idx, b_idx) as the kernel reads them (`_launch.index_arg`)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            "gathered_tn_matmul expects a [T, Ka] and b [T, Kb] with the same T; got "
            f"a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    return tuple(None if idx is None else index_arg(idx, name, "gathered_tn_matmul", src.device)
                 for name, idx, src in (("a_idx", a_idx, a), ("b_idx", b_idx, b)))


def gather_columns(t: Tensor, idx: Tensor) -> Tensor:
    """t[:, idx] as a new [T, |idx|] tensor (t [T, K], idx 1-D integer).

    torch.gather with a broadcast index: on CPU about twice as fast as index_select(1, idx), which
    copies one element at a time (0.11 vs 0.22 ms for 154 of 1536 columns of 1024 rows, 2 cores).
    """
    return torch.gather(t, 1, idx.long().expand(t.shape[0], -1))


def gathered_tn_matmul_reference(
    a: Tensor, b: Tensor, a_idx: Tensor | None = None, b_idx: Tensor | None = None,
    colsum: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """out = a[:, a_idx]^T b[:, b_idx] in fp32 ([|a_idx|, |b_idx|]), colsum = sum_t a[t, a_idx]."""
    _check(a, b, a_idx, b_idx)
    a_g = a if a_idx is None else gather_columns(a, a_idx)
    b_g = b if b_idx is None else gather_columns(b, b_idx)
    sums = a_g.sum(0, dtype=torch.float32) if colsum else None
    if a_g.is_cuda and a_g.dtype == b_g.dtype and a_g.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a_g.t(), b_g, out_dtype=torch.float32), sums  # cuBLAS: fp32 accumulation and result
    return a_g.float().t() @ b_g.float(), sums


def gathered_tn_matmul_triton(
    a: Tensor, b: Tensor, a_idx: Tensor | None = None, b_idx: Tensor | None = None,
    colsum: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The fused kernel (CUDA, or CPU under TRITON_INTERPRET=1); same result as the reference."""
    a_idx, b_idx = _check(a, b, a_idx, b_idx)
    m = a.shape[1] if a_idx is None else a_idx.numel()
    n = b.shape[1] if b_idx is None else b_idx.numel()
    t = a.shape[0]
    out = torch.empty(m, n, device=a.device, dtype=torch.float32)
    sums = torch.empty(m if colsum else 0, device=a.device, dtype=torch.float32)
    if m == 0 or n == 0:
        return out, (sums if colsum else None)
    if t == 0:
        return out.zero_(), (sums.zero_() if colsum else None)
    ieee = INTERPRET or a.dtype == torch.float32 or b.dtype == torch.float32 or a.dtype != b.dtype
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    record_flops(2 * m * n * t)
    _gathered_tn_matmul_kernel[grid](
        # unused pointer arguments get a live tensor (never an empty one: its pointer may be null)
        a, b, a if a_idx is None else a_idx, b if b_idx is None else b_idx, out, sums if colsum else out,
        m, n, t, bucket(m), bucket(n), bucket(t),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        GATHER_A=a_idx is not None, GATHER_B=b_idx is not None, COLSUM=colsum, IEEE=ieee,
    )
    return out, (sums if colsum else None)


def gathered_tn_matmul(
    a: Tensor, b: Tensor, a_idx: Tensor | None = None, b_idx: Tensor | None = None,
    colsum: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Dispatch (`_launch.use_triton`): the reference (gather + BLAS), the kernel only when forced."""
    if use_triton(a, auto_on_cuda=False):
        return gathered_tn_matmul_triton(a, b, a_idx, b_idx, colsum)
    return gathered_tn_matmul_reference(a, b, a_idx, b_idx, colsum)


def column_slice_grad(dy: Tensor, a_s: Tensor) -> Tensor:
    """dW[:, S] = dY^T A_S in fp32, [d_out, |S|], from dY [T, d_out] and A_S = A[:, S] [T, |S|].

    For |S| < d_out it is computed as (A_S^T dY)^T (a transposed view): CPU BLAS runs the
    [T]-reduction faster with the longer output dimension contiguous (0.37 vs 0.46 ms for
    |S| = 154, d_out = 384, T = 1024 on 2 cores; equal at |S| = d_out).
    """
    if a_s.shape[1] < dy.shape[1]:
        return gathered_tn_matmul(a_s, dy)[0].t()
    return gathered_tn_matmul(dy, a_s)[0]
