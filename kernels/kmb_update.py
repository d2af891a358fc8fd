"""Fused memory-bank update (paper eqs. 4-6): window mean -> EMA into local memory, [CLS] -> running mean.

For each span e (E spans, in the order given) with bank row `slots[e]`:

    w_e = mean(hidden[rows[e], lo[e]:hi[e]])                                   (eq. 4, window [lo, hi))
    local[slot] <- (1 - gamma) * local[slot] + gamma * w_e                     (eq. 5)
    if cls_index[e] >= 0:                                                      (eq. 6, as a running mean)
        counts[slot] += 1
        gmean[slot] <- gmean[slot] + (cls[cls_index[e]] - gmean[slot]) / counts[slot]

Duplicate rule: spans of the same slot are applied sequentially in span order (a sequential EMA, and
a running mean in that order). Arithmetic is fp32; each touched bank row is read once, updated in
registers over all its spans and rounded to the storage dtype once; the kernel reads counts and the
launcher adds the new contexts to them afterwards. No float atomics: the result is deterministic.

Shapes: hidden [R, n, d] (any float dtype, last dim contiguous); rows, lo, hi, slots, cls_index [E]
int32/int64, any stride (the launcher makes them contiguous int64); cls [C, d]; local, gmean [N, d]
contiguous (storage dtype); counts [N] int64. The bank tensors are updated in place. Span values are
assumed validated by the caller (`KnowledgeMemoryBank.update`).

`kmb_update_ref` is the plain PyTorch reference (the CPU path); `kmb_update_triton` launches the
Triton kernel (one program per (distinct slot, block of d); no autotuning); `kmb_update` dispatches
(`_launch.use_triton`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import index_arg, use_triton

BLOCK_W = 16  # window positions loaded per tile


def group_by_slot(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable grouping of spans by slot.

    Returns order [E] (span indices sorted by slot, span order kept within a slot), offsets [G+1]
    (group g is order[offsets[g]:offsets[g+1]]) and group [E] (the group of each span).
    """
    sorted_slots, order = torch.sort(slots, stable=True)
    _, sizes = torch.unique_consecutive(sorted_slots, return_counts=True)
    offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int64, device=slots.device)
    torch.cumsum(sizes, 0, out=offsets[1:])
    group = torch.empty_like(order)
    group[order] = torch.repeat_interleave(torch.arange(sizes.numel(), device=slots.device), sizes)
    return order, offsets, group


def window_mean_ref(hidden: torch.Tensor, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Eq. 4: fp32 [E, d], row e the mean of hidden[rows[e], lo[e]:hi[e]] (hi > lo).

    One ragged `embedding_bag` over the flattened states: bag e holds the window's positions.
    """
    width = hi - lo
    offsets = torch.zeros(width.numel() + 1, dtype=torch.int64, device=width.device)
    torch.cumsum(width, 0, out=offsets[1:])
    first = rows * hidden.shape[1] + lo  # flat index of each window's first position
    flat = torch.arange(int(offsets[-1]), device=width.device)
    flat -= torch.repeat_interleave(offsets[:-1] - first, width)
    states = hidden.reshape(-1, hidden.shape[-1]).float()
    return F.embedding_bag(flat, states, offsets, mode="mean", include_last_offset=True)


def ema_apply_ref(
    means: torch.Tensor,
    slots: torch.Tensor,
    cls: torch.Tensor,
    cls_index: torch.Tensor,
    local: torch.Tensor,
    gmean: torch.Tensor,
    counts: torch.Tensor,
    gamma: float,
) -> None:
    """Eqs. 5-6 given the window means [E, d]: sequential EMA / running mean per slot, in span order."""
    if slots.numel() == 0:
        return
    order, offsets, group = group_by_slot(slots)
    uniq = slots[order[offsets[:-1]]]
    rank = torch.empty_like(order)  # occurrence number of each span within its slot
    rank[order] = torch.arange(slots.numel(), device=slots.device)
    rank -= offsets[group]
    b_local, b_gmean, b_count = local[uniq].float(), gmean[uniq].float(), counts[uniq].clone()
    for r in range(int(rank.max()) + 1):  # each round touches every group at most once
        sel = torch.nonzero(rank == r).squeeze(1)
        g = group[sel]
        b_local[g] = (1 - gamma) * b_local[g] + gamma * means[sel]
        ci = cls_index[sel]
        has_cls = ci >= 0
        g, ci = g[has_cls], ci[has_cls]
        b_count[g] += 1
        b_gmean[g] += (cls[ci].float() - b_gmean[g]) / b_count[g, None].float()
    local[uniq] = b_local.to(local.dtype)
    gmean[uniq] = b_gmean.to(gmean.dtype)
    counts[uniq] = b_count


def kmb_update_ref(hidden, rows, lo, hi, slots, cls, cls_index, local, gmean, counts, gamma: float) -> None:
    """PyTorch reference of the fused update (module docstring); updates local, gmean, counts in place."""
    ema_apply_ref(window_mean_ref(hidden, rows, lo, hi), slots, cls, cls_index, local, gmean, counts, gamma)


@triton.jit
def _kmb_update_kernel(
    hidden_ptr, rows_ptr, lo_ptr, hi_ptr, slots_ptr, cls_ptr, cls_index_ptr, order_ptr, offsets_ptr,
    local_ptr, gmean_ptr, counts_ptr,
    gamma, d, stride_hr, stride_hn, stride_c,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_g, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < d
    o_w = tl.arange(0, BLOCK_W)
    g_start = tl.load(offsets_ptr + i_g)
    g_end = tl.load(offsets_ptr + i_g + 1)
    slot = tl.load(slots_ptr + tl.load(order_ptr + g_start)).to(tl.int64)
    b_local = tl.load(local_ptr + slot * d + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_gmean = tl.load(gmean_ptr + slot * d + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_count = tl.load(counts_ptr + slot)
    for j in range(g_start, g_end):
        i_e = tl.load(order_ptr + j)
        row = tl.load(rows_ptr + i_e).to(tl.int64)
        lo = tl.load(lo_ptr + i_e).to(tl.int32)  # positions within one sequence
        hi = tl.load(hi_ptr + i_e).to(tl.int32)
        b_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p0 in range(lo, hi, BLOCK_W):
            o_p = p0 + o_w
            m_p = o_p < hi
            p_h = hidden_ptr + row * stride_hr + o_p[:, None].to(tl.int64) * stride_hn + o_d[None, :]
            b_h = tl.load(p_h, mask=m_p[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_sum += tl.sum(b_h, axis=0)
        b_local = (1 - gamma) * b_local + gamma * (b_sum / (hi - lo).to(tl.float32))
        i_c = tl.load(cls_index_ptr + i_e)
        b_count += (i_c >= 0).to(tl.int64)
        m_c = (i_c + 0 * o_d) >= 0  # [BLOCK_D]: this span brings a [CLS] state
        b_cls = tl.load(cls_ptr + i_c.to(tl.int64) * stride_c + o_d, mask=m_d & m_c, other=0.0).to(tl.float32)
        b_step = (b_cls - b_gmean) / tl.maximum(b_count, 1).to(tl.float32)
        b_gmean += tl.where(m_c, b_step, 0.0)
    tl.store(local_ptr + slot * d + o_d, b_local.to(local_ptr.dtype.element_ty), mask=m_d)
    tl.store(gmean_ptr + slot * d + o_d, b_gmean.to(gmean_ptr.dtype.element_ty), mask=m_d)


def kmb_update_triton(hidden, rows, lo, hi, slots, cls, cls_index, local, gmean, counts, gamma: float) -> None:
    """Triton launch of the fused update (same contract as `kmb_update_ref`)."""
    rows, lo, hi, slots, cls_index = (index_arg(t, name, "kmb_update", hidden.device) for name, t in (
        ("rows", rows), ("lo", lo), ("hi", hi), ("slots", slots), ("cls_index", cls_index)))
    if len({t.numel() for t in (rows, lo, hi, slots, cls_index)}) != 1:
        raise ValueError("kmb_update: rows, lo, hi, slots and cls_index need one entry per span, got "
                         f"{[t.numel() for t in (rows, lo, hi, slots, cls_index)]}")
    if slots.numel() == 0:
        return
    if hidden.stride(-1) != 1 or cls.stride(-1) != 1:
        raise ValueError("kmb_update: hidden and cls need a contiguous last dimension")
    if not (local.is_contiguous() and gmean.is_contiguous() and counts.is_contiguous() and counts.dtype == torch.int64):
        raise ValueError("kmb_update: local, gmean and counts must be contiguous, counts int64")
    d = hidden.shape[-1]
    order, offsets, _ = group_by_slot(slots)
    block_d = max(16, min(triton.next_power_of_2(d), 128))
    grid = (offsets.numel() - 1, triton.cdiv(d, block_d))
    _kmb_update_kernel[grid](
        hidden, rows, lo, hi, slots, cls, cls_index, order, offsets,
        local, gmean, counts,
        float(gamma), d, hidden.stride(0), hidden.stride(1), cls.stride(0),
        BLOCK_W=BLOCK_W, BLOCK_D=block_d,
    )
    # every d-block program reads the old count, so the new counts are written after the kernel
    counts.index_add_(0, slots, (cls_index >= 0).long())


def kmb_update(hidden, rows, lo, hi, slots, cls, cls_index, local, gmean, counts, gamma: float) -> None:
    """Dispatch (`_launch.use_triton`): the Triton kernel for CUDA tensors, the PyTorch reference otherwise."""
    fn = kmb_update_triton if use_triton(hidden) else kmb_update_ref
    fn(hidden, rows, lo, hi, slots, cls, cls_index, local, gmean, counts, gamma)
