"""Lazy AdamW on slices of a weight: the rows (dim 0) or columns (dim 1) listed in `idx`.

For each selected slice j = idx[s] with its gradient slice g = grad[s] (grad has the parameter's
shape with `dim` of size |idx|) and its own step count t = steps[j] (already incremented for this
step), exactly torch.optim.AdamW's update restricted to that slice:

    p <- p * (1 - lr * wd)
    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Unselected slices, and their moments, are not touched at all (no momentum drift, no decay).
`lr`: a float, or a 0-dim fp32 tensor on the parameter's device read there (the kernel loads it
through a pointer), so that a CUDA graph capturing the update reads each step's rate.
`skip` (optional bool scalar tensor on the parameter's device): when true nothing is written; a
step with a non-finite loss is dropped this way without the host reading the flag.
`slice_adamw_reference` is index_select + the update + index_copy_ in PyTorch;
`slice_adamw_triton` is one fused in-place kernel (a program per (slice, element block), math in
fp32); `slice_adamw` dispatches (`_launch.use_triton`: Triton on CUDA, the reference elsewhere). The kernel
writes p, m and v in place, so the autotuner restores them after each benchmark run; its key is the
slice length, fixed per parameter. Tests run the kernel on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import autotune, index_arg, use_triton

_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=1),
    triton.Config({"BLOCK_N": 256}, num_warps=2),
    triton.Config({"BLOCK_N": 1024}, num_warps=4),
]


@autotune(_CONFIGS, key=["N"], restore_value=["p_ptr", "m_ptr", "v_ptr"])
@triton.jit
def _slice_adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, idx_ptr, step_ptr, skip_ptr,
    N, stride_ps, stride_pn, stride_gs, stride_gn,
    lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
    LR_PTR: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_s, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    if LR_PTR:  # lr is a pointer to the rate (a device tensor)
        lr = tl.load(lr).to(tl.float32)
    j = tl.load(idx_ptr + i_s)
    t = tl.load(step_ptr + j).to(tl.float32)
    bc1 = 1.0 - tl.exp2(t * log2_beta1)
    bc2 = 1.0 - tl.exp2(t * log2_beta2)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    m_store = m_n
    if HAS_SKIP:  # skip_ptr: the bool flag itself; a skipped step stores nothing
        m_store = m_store & ((o_n * 0 + tl.load(skip_ptr).to(tl.int32)) == 0)
    o_p = j * stride_ps + o_n * stride_pn
    b_p = tl.load(p_ptr + o_p, mask=m_n, other=0.0).to(tl.float32)
    b_m = tl.load(m_ptr + o_p, mask=m_n, other=0.0).to(tl.float32)
    b_v = tl.load(v_ptr + o_p, mask=m_n, other=0.0).to(tl.float32)
    b_g = tl.load(g_ptr + i_s * stride_gs + o_n * stride_gn, mask=m_n, other=0.0).to(tl.float32)
    b_p = b_p * (1.0 - lr * weight_decay)
    b_m = beta1 * b_m + (1.0 - beta1) * b_g
    b_v = beta2 * b_v + (1.0 - beta2) * b_g * b_g
    b_denom = tl.sqrt(b_v) / tl.sqrt(bc2) + eps
    b_p = b_p - (lr / bc1) * b_m / b_denom
    tl.store(p_ptr + o_p, b_p.to(p_ptr.dtype.element_ty), mask=m_store)
    tl.store(m_ptr + o_p, b_m.to(m_ptr.dtype.element_ty), mask=m_store)
    tl.store(v_ptr + o_p, b_v.to(v_ptr.dtype.element_ty), mask=m_store)


def _check(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor,
           idx: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Validate the arguments; returns (idx, steps) as the kernel reads them (`_launch.index_arg`)."""
    if param.dim() not in (1, 2) or dim not in range(param.dim()):
        raise ValueError(f"slice_adamw: param must be 1-D or 2-D with dim in range, got "
                         f"{tuple(param.shape)} dim={dim}")
    idx = index_arg(idx, "idx", "slice_adamw", param.device)
    steps = index_arg(steps, "steps", "slice_adamw", param.device)
    want = list(param.shape)
    want[dim] = idx.numel()
    if list(grad.shape) != want:
        raise ValueError(f"slice_adamw: grad shape {tuple(grad.shape)} != {tuple(want)} "
                         f"(param {tuple(param.shape)} with dim {dim} cut to |idx|={idx.numel()})")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or t.stride() != param.stride():
            raise ValueError(f"slice_adamw: {name} must match the param's shape and strides, got "
                             f"{tuple(t.shape)} {t.stride()} vs {tuple(param.shape)} {param.stride()}")
    if steps.shape != (param.shape[dim],):
        raise ValueError(f"slice_adamw: steps must have shape ({param.shape[dim]},), got {tuple(steps.shape)}")
    return idx, steps


def slice_adamw_reference(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                          steps: Tensor, idx: Tensor, dim: int, lr: float | Tensor, beta1: float,
                          beta2: float, eps: float, weight_decay: float, skip: Tensor | None = None) -> None:
    """In-place lazy AdamW on `param`'s slices `idx` along `dim` (formula in the module docstring)."""
    _check(param, grad, exp_avg, exp_avg_sq, steps, idx, dim)
    shape = [1] * param.dim()
    shape[dim] = -1
    t = steps.index_select(0, idx).double()
    bc1 = (1 - beta1 ** t).float().view(shape)
    bc2_sqrt = (1 - beta2 ** t).sqrt().float().view(shape)
    old = [t.index_select(dim, idx).float() for t in (param, exp_avg, exp_avg_sq)]  # p, m, v (kept for skip)
    g = grad.float()
    m = torch.lerp(old[1], g, 1 - beta1)
    v = torch.addcmul(old[2] * beta2, g, g, value=1 - beta2)
    p = old[0] * (1 - lr * weight_decay) - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)
    for dst, new, before in zip((param, exp_avg, exp_avg_sq), (p, m, v), old):
        dst.index_copy_(dim, idx, (new if skip is None else torch.where(skip, before, new)).to(dst.dtype))


def slice_adamw_triton(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                       steps: Tensor, idx: Tensor, dim: int, lr: float | Tensor, beta1: float,
                       beta2: float, eps: float, weight_decay: float, skip: Tensor | None = None) -> None:
    """The fused in-place kernel (CUDA, or CPU under TRITON_INTERPRET=1); same result as the reference."""
    idx, steps = _check(param, grad, exp_avg, exp_avg_sq, steps, idx, dim)
    k = idx.numel()
    if k == 0:
        return
    if param.dim() == 1:
        n, sp, sn, sg, sgn = 1, param.stride(0), 0, grad.stride(0), 0
    else:
        other = 1 - dim
        n, sp, sn = param.shape[other], param.stride(dim), param.stride(other)
        sg, sgn = grad.stride(dim), grad.stride(other)
    log2 = lambda b: math.log2(b) if b > 0 else float("-inf")  # noqa: E731
    grid = lambda meta: (k, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _slice_adamw_kernel[grid](
        param, grad, exp_avg, exp_avg_sq, idx, steps, steps if skip is None else skip,  # no flag: not read
        n, sp, sn, sg, sgn,
        lr, beta1, beta2, log2(beta1), log2(beta2), eps, weight_decay, LR_PTR=isinstance(lr, Tensor),
        HAS_SKIP=skip is not None,
    )


def slice_adamw(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor,
                idx: Tensor, dim: int, lr: float | Tensor, beta1: float, beta2: float, eps: float,
                weight_decay: float, skip: Tensor | None = None) -> None:
    """Dispatch (`_launch.use_triton`): the Triton kernel for CUDA tensors, the PyTorch reference otherwise."""
    fn = slice_adamw_triton if use_triton(param) else slice_adamw_reference
    fn(param, grad, exp_avg, exp_avg_sq, steps, idx, dim, lr, beta1, beta2, eps, weight_decay, skip)
