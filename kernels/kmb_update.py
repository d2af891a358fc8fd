"""Fused memory-bank update (paper eqs. 4-6): window mean -> EMA into local memory, [CLS] -> running mean.

For each span e (E spans, in the order given) with bank row `slots[e]`:

    w_e = mean(hidden[rows[e], lo[e]:hi[e]])                                   (eq. 4, window [lo, hi))
    local[slot] <- (1 - gamma) * local[slot] + gamma * w_e                     (eq. 5)
    if cls_index[e] >= 0:                                                      (eq. 6, as a running mean)
        counts[slot] += 1
        gmean[slot] <- gmean[slot] + (cls[cls_index[e]] - gmean[slot]) / counts[slot]

A span with an empty window (hi == lo: the padding of a batch with static shapes) folds in nothing;
give it cls_index -1 too.

Duplicate rule: spans of the same slot are applied sequentially in span order (a sequential EMA, and
a running mean in that order). Arithmetic is fp32; each touched bank row is read once, updated in
registers over all its spans and rounded to the storage dtype once; the kernel reads counts and the
launcher adds the new contexts to them afterwards. No float atomics: the result is deterministic.

Shapes: hidden [R, n, d] (any float dtype, last dim contiguous); rows, lo, hi, slots, cls_index [E]
int32/int64, any stride (the launcher makes them contiguous int64); cls [C, d]; local, gmean [N, d]
contiguous (storage dtype); counts [N] int64. The bank tensors are updated in place. Span values are
assumed validated by the caller (`KnowledgeMemoryBank.update`).

`kmb_update_ref` is the plain PyTorch reference (the CPU path); `kmb_update_triton` launches the
Triton kernel (one program per (span, block of d), those past the distinct slots idle; no autotuning); `kmb_update` dispatches
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
    """Stable grouping of E spans by slot, without asking the device how many slots are distinct.

    Returns order [E] (span indices sorted by slot, span order kept within a slot), offsets [E+1]
    (group g is order[offsets[g]:offsets[g+1]] for the G distinct slots; offsets[g] = E for g >= G,
    so groups G..E-1 are empty) and group [E] (the group of each span).
    """
    e = slots.numel()
    sorted_slots, order = torch.sort(slots, stable=True)
    new = torch.ones(e, dtype=torch.bool, device=slots.device)
    new[1:] = sorted_slots[1:] != sorted_slots[:-1]
    group_sorted = torch.cumsum(new, 0) - 1
    position = torch.arange(e, device=slots.device)
    offsets = torch.full((e + 1,), e, dtype=torch.int64, device=slots.device)
    offsets.scatter_reduce_(0, group_sorted, position, "amin")
    group = torch.empty_like(order).scatter_(0, order, group_sorted)
    return order, offsets, group


def window_mean_ref(hidden: torch.Tensor, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Eq. 4: fp32 [E, d], row e the mean of hidden[rows[e], lo[e]:hi[e]] (0 for an empty window).

    From prefix sums over the positions (c[:, j] = sum of positions < j): (c[row, hi] - c[row, lo]) /
    (hi - lo); no output size depends on the windows, so nothing waits for the device.
    """
    prefix = F.pad(hidden.float().cumsum(1), (0, 0, 1, 0))  # [R, n + 1, d]
    return (prefix[rows, hi] - prefix[rows, lo]) / (hi - lo).clamp(min=1).unsqueeze(1)


def ema_apply_ref(
    means: torch.Tensor,
    slots: torch.Tensor,
    cls: torch.Tensor,
    cls_index: torch.Tensor,
    local: torch.Tensor,
    gmean: torch.Tensor,
    counts: torch.Tensor,
    gamma: float,
    rounds: int | None = None,
    skip: torch.Tensor | None = None,
    live: torch.Tensor | None = None,
) -> None:
    """Eqs. 5-6 given the window means [E, d]: sequential EMA / running mean per slot, in span order.

    Round r applies the r-th span of every slot at once (index_add of deltas that are zero for the
    other spans). ``rounds``: the most spans any slot has (computed, with a host sync, when None);
    ``skip``: a bool scalar tensor; when true nothing changes; ``live`` [E] bool: the spans whose
    window mean folds into the local memory (None: all).
    """
    e = slots.numel()
    if e == 0:
        return
    order, offsets, group = group_by_slot(slots)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(e, device=slots.device)) - offsets[group]
    if rounds is None:
        rounds = int(rank.max()) + 1
    has_cls = cls_index >= 0
    cls_rows = cls.index_select(0, cls_index.clamp(min=0)).float()
    slot_of_group = torch.zeros_like(slots).scatter_(0, group, slots)  # rows >= G unused
    b_local, b_gmean = local[slot_of_group].float(), gmean[slot_of_group].float()
    b_count = counts[slot_of_group]
    for r in range(rounds):  # each round touches every group at most once
        now = rank == r
        folds = now if live is None else now & live
        b_local.index_add_(0, group, torch.where(folds[:, None], gamma * (means - b_local[group]), 0.0))
        now &= has_cls
        b_count.index_add_(0, group, now.long())
        step = (cls_rows - b_gmean[group]) / b_count[group, None].clamp(min=1).float()
        b_gmean.index_add_(0, group, torch.where(now[:, None], step, 0.0))
    new = [b_local[group].to(local.dtype), b_gmean[group].to(gmean.dtype), b_count[group]]
    for dst, src in zip((local, gmean, counts), new):  # spans of one slot write the same value
        dst.index_put_((slots,), src if skip is None else torch.where(skip, dst[slots], src))


def kmb_update_ref(hidden, rows, lo, hi, slots, cls, cls_index, local, gmean, counts, gamma: float,
                   rounds: int | None = None, skip: torch.Tensor | None = None) -> None:
    """PyTorch reference of the fused update (module docstring); updates local, gmean, counts in place."""
    ema_apply_ref(window_mean_ref(hidden, rows, lo, hi), slots, cls, cls_index, local, gmean, counts, gamma,
                  rounds, skip, live=hi > lo)


@triton.jit
def _kmb_update_kernel(
    hidden_ptr, rows_ptr, lo_ptr, hi_ptr, slots_ptr, cls_ptr, cls_index_ptr, order_ptr, offsets_ptr,
    local_ptr, gmean_ptr, counts_ptr, skip_ptr,
    gamma, d, stride_hr, stride_hn, stride_c,
    HAS_SKIP: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_g, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < d
    o_w = tl.arange(0, BLOCK_W)
    g_start = tl.load(offsets_ptr + i_g)
    g_end = tl.load(offsets_ptr + i_g + 1)
    live = g_start < g_end  # programs past the G distinct slots have an empty group
    m_d = m_d & ((o_d * 0 + g_start) < g_end)  # [BLOCK_D]
    if HAS_SKIP:  # skip_ptr: the bool flag itself; a skipped step stores nothing
        m_d = m_d & ((o_d * 0 + tl.load(skip_ptr).to(tl.int32)) == 0)
    slot = tl.load(slots_ptr + tl.load(order_ptr + tl.where(live, g_start, 0))).to(tl.int64)  # a real row
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
        folded = (1 - gamma) * b_local + gamma * (b_sum / tl.maximum(hi - lo, 1).to(tl.float32))
        b_local = tl.where(hi > lo, folded, b_local)  # an empty window (padding) folds in nothing
        i_c = tl.load(cls_index_ptr + i_e)
        b_count += (i_c >= 0).to(tl.int64)
        m_c = (i_c + 0 * o_d) >= 0  # [BLOCK_D]: this span brings a [CLS] state
        b_cls = tl.load(cls_ptr + i_c.to(tl.int64) * stride_c + o_d, mask=m_d & m_c, other=0.0).to(tl.float32)
        b_step = (b_cls - b_gmean) / tl.maximum(b_count, 1).to(tl.float32)
        b_gmean += tl.where(m_c, b_step, 0.0)
    tl.store(local_ptr + slot * d + o_d, b_local.to(local_ptr.dtype.element_ty), mask=m_d)
    tl.store(gmean_ptr + slot * d + o_d, b_gmean.to(gmean_ptr.dtype.element_ty), mask=m_d)


def kmb_update_triton(hidden, rows, lo, hi, slots, cls, cls_index, local, gmean, counts, gamma: float,
                      rounds: int | None = None, skip: torch.Tensor | None = None) -> None:
    """Triton launch of the fused update (same contract as `kmb_update_ref`; ``rounds`` is not needed).

    One program per (span, block of d): the grid has E rows because the number of distinct slots
    is not known on the host; programs past the G groups store nothing."""
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
        local, gmean, counts, counts if skip is None else skip,  # without a flag the pointer is not read
        float(gamma), d, hidden.stride(0), hidden.stride(1), cls.stride(0),
        HAS_SKIP=skip is not None, BLOCK_W=BLOCK_W, BLOCK_D=block_d,
    )
    # every d-block program reads the old count, so the new counts are written after the kernel
    added = cls_index >= 0
    counts.index_add_(0, slots, (added if skip is None else added & ~skip).long())


def kmb_update(hidden, rows, lo, hi, slots, cls, cls_index, local, gmean, counts, gamma: float,
               rounds: int | None = None, skip: torch.Tensor | None = None) -> None:
    """Dispatch (`_launch.use_triton`): the Triton kernel for CUDA tensors, the PyTorch reference otherwise.

    ``rounds``: the most spans of one slot (lets the reference run without a host sync); ``skip``:
    a bool scalar tensor on the bank's device, true to leave the bank unchanged (a skipped step)."""
    fn = kmb_update_triton if use_triton(hidden) else kmb_update_ref
    fn(hidden, rows, lo, hi, slots, cls, cls_index, local, gmean, counts, gamma, rounds, skip)
