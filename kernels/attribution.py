"""Fused integrated-gradients reduction for FFN neuron attribution (paper eqs. 10-11).

For one FFN layer with down projection W2 [d, I] (nn.Linear weight: FFN_out = v W2^T + b2), the
gradient of P with respect to the neuron values v [N, I] at quadrature point k is g_k W2, where
g_k = dP/dFFN_out [N, d]. The attribution score of neuron i, summed over the N target positions, is

    score[i] = sum_p v[p, i] * ( (sum_k w_k g_k[p, :]) W2 )[i]

with quadrature weights w_k (Riemann, eq. 11: w_k = 1/m). The step sum is taken in d-space, so no
[m, N, I] tensor exists. `attribution_scores_reference` is the plain PyTorch form;
`attribution_scores_triton` fuses the step reduction, the projection through W2, the product with v
and the reduction over positions in one kernel: each program owns BLOCK_I neurons and walks the
positions and the hidden dimension. `attribution_scores` dispatches: Triton on CUDA tensors, the
reference elsewhere (CPU). Tests run the kernel on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import autotune, bucket, record_flops, use_triton

_CONFIGS = [
    triton.Config({"BLOCK_N": 16, "BLOCK_D": 32, "BLOCK_I": 64}, num_warps=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_D": 64, "BLOCK_I": 64}, num_warps=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 32, "BLOCK_I": 128}, num_warps=8),
]


@autotune(_CONFIGS, key=["N_BUCKET", "D", "I"])
@triton.jit
def _attribution_kernel(
    g_ptr, w_ptr, w2_ptr, v_ptr, out_ptr,
    M, N, D, I, N_BUCKET,  # N_BUCKET: autotune key only
    stride_gk, stride_gn, stride_gd,
    stride_w2d, stride_w2i,
    stride_vn, stride_vi,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
):
    i_i = tl.program_id(0).to(tl.int64)
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i = o_i < I
    b_out = tl.zeros([BLOCK_I], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        b_acc = tl.zeros([BLOCK_N, BLOCK_I], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            m_nd = m_n[:, None] & m_d[None, :]
            p_g = g_ptr + o_n[:, None] * stride_gn + o_d[None, :] * stride_gd
            b_g = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for k in range(0, M):  # p_g steps through the m quadrature points (64-bit pointer arithmetic)
                b_wk = tl.load(w_ptr + k).to(tl.float32)
                b_g += b_wk * tl.load(p_g, mask=m_nd, other=0.0).to(tl.float32)
                p_g += stride_gk
            p_w2 = w2_ptr + o_d[:, None] * stride_w2d + o_i[None, :] * stride_w2i
            b_w2 = tl.load(p_w2, mask=m_d[:, None] & m_i[None, :], other=0.0).to(tl.float32)
            b_acc += tl.dot(b_g, b_w2, input_precision="ieee")
        p_v = v_ptr + o_n[:, None] * stride_vn + o_i[None, :] * stride_vi
        b_v = tl.load(p_v, mask=m_n[:, None] & m_i[None, :], other=0.0).to(tl.float32)
        b_out += tl.sum(b_v * b_acc, axis=0)
    tl.store(out_ptr + o_i, b_out, mask=m_i)


def _check(grads: Tensor, weights: Tensor, w2: Tensor, v: Tensor) -> None:
    if grads.dim() != 3 or weights.dim() != 1 or w2.dim() != 2 or v.dim() != 2:
        raise ValueError(
            "attribution_scores expects grads [m, N, d], weights [m], w2 [d, I], v [N, I]; got "
            f"{tuple(grads.shape)}, {tuple(weights.shape)}, {tuple(w2.shape)}, {tuple(v.shape)}"
        )
    m, n, d = grads.shape
    if weights.shape[0] != m or w2.shape[0] != d or v.shape != (n, w2.shape[1]):
        raise ValueError(
            f"attribution_scores: inconsistent shapes grads {tuple(grads.shape)}, weights {tuple(weights.shape)}, "
            f"w2 {tuple(w2.shape)}, v {tuple(v.shape)}"
        )


def attribution_scores_reference(grads: Tensor, weights: Tensor, w2: Tensor, v: Tensor) -> Tensor:
    """score [I] = sum_p v[p] * ((sum_k weights[k] grads[k, p]) @ w2), computed in fp32."""
    _check(grads, weights, w2, v)
    g_sum = torch.einsum("k,knd->nd", weights.float(), grads.float())
    return (v.float() * (g_sum @ w2.float())).sum(0)


def attribution_scores_triton(grads: Tensor, weights: Tensor, w2: Tensor, v: Tensor) -> Tensor:
    """The fused kernel (CUDA, or CPU under TRITON_INTERPRET=1); same result as the reference, fp32 [I]."""
    _check(grads, weights, w2, v)
    m, n, d = grads.shape
    i = w2.shape[1]
    out = torch.empty(i, dtype=torch.float32, device=grads.device)
    weights = weights.to(device=grads.device, dtype=torch.float32).contiguous()

    def grid(meta):
        return (triton.cdiv(i, meta["BLOCK_I"]),)

    record_flops(2 * m * n * d + 2 * n * d * i)  # the reference's einsum over steps and its projection

    _attribution_kernel[grid](
        grads, weights, w2, v, out,
        m, n, d, i, bucket(n),
        grads.stride(0), grads.stride(1), grads.stride(2),
        w2.stride(0), w2.stride(1),
        v.stride(0), v.stride(1),
    )
    return out


def attribution_scores(grads: Tensor, weights: Tensor, w2: Tensor, v: Tensor) -> Tensor:
    """Neuron scores [I] (fp32): the Triton kernel on CUDA tensors, the PyTorch reference otherwise."""
    if use_triton(grads):
        return attribution_scores_triton(grads, weights, w2, v)
    return attribution_scores_reference(grads, weights, w2, v)
