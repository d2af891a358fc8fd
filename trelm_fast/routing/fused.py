"""The fused batched attribution (`attribute`, paper eqs. 9-11); the design is in docs/routing.md.

The layers run once without gradients (the shared prefix), which gives every layer's attention
state a_l, output h_l and target-position neurons v_l. Since FFN_out = v W2^T + b2 is linear in
v, the m scaled copies of layer l differ only in F_k = alpha_k (v_t W2^T) + b2 at the target
positions, a [m, N, d] leaf; the copies start at layer l's output (LayerNorm(F_k + a_l) for
post-LayerNorm layers, per position), which differs from the prefix's output only at the targets.

All attributed layers share one pass up the stack and one backward: going up from the lowest
attributed layer, the batch at layer j holds the copies of every attributed l < j (already
diverged from the prefix), and at layer j's output the copies of l = j are appended. The last
layer computes its attention state (the adapter's `attention_at`) and FFN only at the targets (all
that P reads). One backward of P summed over all copies gives every layer's G_k = dP/dF_k;
dP/dv at step k is G_k W2, so Attr = v_t * ((sum_k w_k G_k) W2) summed over t, computed by
`kernels.attribution` (no [m, N, I] tensor).

Memory: the copies of one pass are all alive at its backward. `max_copies` bounds them: a pass
carries c quadrature points of every layer of a group, c * B' * (layers in the group) <= max_copies
sequence copies (c >= 1; the layers are split into groups only when one point of every layer
exceeds the bound, and one point of one layer, B' copies, always runs). 0 picks `auto_max_copies`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from trelm_fast.kernels.attribution import attribution_scores
from trelm_fast.losses import MLMHead, cka_correct_prob_at
from trelm_fast.models.base import Positions
from trelm_fast.routing.attribution import (
    Attribution, Targets, empty_attribution, frozen_eval, prefix_pass, resolve_problem,
)

CPU_MAX_COPIES = 64
"""Sequence copies alive at once on CPU (auto): see docs/routing.md, Measurements."""
ACTIVATIONS_PER_LAYER = 16
"""[n, d] tensors a copy keeps per layer for the backward, as `auto_max_copies` counts them: q, k, v,
the attention output and its LayerNorm, the FFN's 4d input and output, and the layer's output."""


def auto_max_copies(hidden: Tensor, layers_above: float) -> int:
    """Sequence copies alive at once for max_copies = 0: `CPU_MAX_COPIES` on CPU; on CUDA as many as
    half the free GPU memory holds, at ACTIVATIONS_PER_LAYER [n, d] tensors of hidden's dtype per
    copy and layer it runs (`layers_above`: the mean over the attributed layers; hidden [B, n, d])."""
    if not hidden.is_cuda:
        return CPU_MAX_COPIES
    free, _ = torch.cuda.mem_get_info(hidden.device)
    n, d = hidden.shape[1:]
    per_copy = ACTIVATIONS_PER_LAYER * n * d * max(1.0, layers_above) * hidden.element_size()
    return max(1, int(0.5 * free // per_copy))


def passes(layer_ids: tuple[int, ...], m: int, sequences: int, max_copies: int) -> tuple[list[tuple[int, ...]], int]:
    """(layer groups, points per pass): each pass carries `points` quadrature points of every layer
    of one group, points * sequences * len(group) <= max_copies where possible (docstring above)."""
    per_group = max(1, min(len(layer_ids), max_copies // sequences))
    groups = [layer_ids[i : i + per_group] for i in range(0, len(layer_ids), per_group)]
    return groups, max(1, min(m, max_copies // (sequences * per_group)))


class _Copies:
    """Batches of sequence copies (copy i is sequence i mod B'): their layer context and target
    positions, built once per width."""

    def __init__(self, model, adapter, t: Targets, ctx):
        self.model, self.adapter, self.t, self.ctx = model, adapter, t, ctx
        self._contexts, self._positions = {}, {}

    def context(self, sets: int):
        """The layer context of `sets` x B' copies: the prefix's tiled when it is None or a tensor
        mask, else built anew by the adapter."""
        if sets not in self._contexts:
            ctx, t, bsz = self.ctx, self.t, self.t.hidden.shape[0]
            if ctx is None or (isinstance(ctx, Tensor) and ctx.shape[0] == 1):
                tiled = ctx
            elif isinstance(ctx, Tensor) and ctx.shape[0] == bsz:
                tiled = ctx.repeat(sets, *[1] * (ctx.dim() - 1))
            else:
                tiled = self.adapter.layer_context(self.model, t.mask.repeat(sets, 1),
                                                   t.hidden[:1].expand(sets * bsz, -1, -1))
            self._contexts[sets] = tiled
        return self._contexts[sets]

    def positions(self, sets: int) -> Positions:
        """The targets' positions in `sets` x B' copies."""
        if sets not in self._positions:
            at, bsz = self.t.at, self.t.hidden.shape[0]
            rows = (torch.arange(sets, device=at.rows.device)[:, None] * bsz + at.rows).reshape(-1)
            self._positions[sets] = Positions(rows, at.cols.repeat(sets), at.slot.repeat(sets), at.per_row)
        return self._positions[sets]


def _one_pass(copies: _Copies, enc, head: MLMHead, prefix: dict, group: tuple[int, ...], alphas: Tensor,
              autocast) -> list[Tensor]:
    """One pass up the stack and one backward for the c = len(alphas) points of the layers in
    `group` (`prefix[l]` = (v_t W2^T [N, d], b2, a_t [N, d], h_l [B', n, d])); returns dP/dF per
    layer of the group, [c, N, d] each."""
    model, adapter, t = copies.model, copies.adapter, copies.t
    top, c = len(enc) - 1, alphas.shape[0]
    leaves, at_top = [], []  # at_top: the copies' final states where P reads them, [sets * N, d]
    h, sets = None, 0  # the copies in flight, [sets * B', n, d] at layer j's output
    with torch.autocast(t.hidden.device.type, dtype=autocast, enabled=autocast is not None):
        for j in range(group[0], top + 1):
            if j in group:  # layer j's copies: the prefix output with its scaled targets
                u_t, b2, a_t, h_j = prefix[j]
                leaf = (alphas[:, None, None] * u_t + b2).requires_grad_(True)  # [c, N, d]
                leaves.append(leaf)
                h_t = adapter.layer_output(enc[j], leaf, a_t).reshape(-1, u_t.shape[-1])  # [c * N, d]
                if j == top:
                    at_top.append(h_t)
                    break
                pos = copies.positions(c)
                new = h_j.repeat(c, 1, 1).to(h_t.dtype)
                new[pos.rows, pos.cols] = h_t
                h, sets = (new, c) if h is None else (torch.cat([h, new]), sets + c)
            if j == top:
                break
            layer = enc[j + 1]
            if j + 1 == top:  # the last layer runs only where P reads
                a = adapter.attention_at(layer, h, copies.context(sets), copies.positions(sets))
            else:
                a = adapter.attention(layer, h, copies.context(sets))
            h = adapter.ffn_out(layer, adapter.neurons(layer, a), a)
        if sets:
            at_top.insert(0, h)
        final = adapter.final_norm(model, torch.cat(at_top))
        n_sets = final.shape[0] // t.labels.shape[0]
        p = cka_correct_prob_at(final, t.labels.repeat(n_sets), t.negatives.repeat(n_sets, 1), head)
    return list(torch.autograd.grad(p.sum(), leaves))


def attribute(
    model: nn.Module,
    hidden: Tensor,
    attention_mask: Tensor,
    cka_labels: Tensor,
    negatives: Tensor,
    m: int = 20,
    quadrature_rule: str = "riemann",
    layers=None,
    sequences: int = 0,
    head: MLMHead | None = None,
    max_copies: int = 0,
    autocast: torch.dtype | None = None,
) -> Attribution:
    """Fused batched IG attribution (eqs. 9-11) for the FFN layers `layers` (None: all).

    hidden: embedding output [B, n, d] (with knowledge injection); attention_mask, cka_labels
    [B, n]; negatives [N, K] for the CKA-labelled positions in row-major order. `sequences` > 0
    attributes only the first that many sequences that have targets. `max_copies` bounds the
    sequence copies alive at once in a pass (memory), not the result (0: `auto_max_copies`).
    `autocast` (e.g. torch.bfloat16) runs the scaled copies under torch.autocast; the prefix, the
    leaf gradients and the step reduction stay in the model's precision.
    """
    if max_copies < 0:
        raise ValueError(f"routing.max_copies must be >= 0 (0 = auto), got {max_copies}")
    pb = resolve_problem(model, hidden, attention_mask, cka_labels, negatives, m, quadrature_rule, layers, sequences,
                         head)
    if pb.targets.labels.numel() == 0:
        return empty_attribution(pb.layer_ids, pb.width, hidden.device)
    adapter, enc, layer_ids, t, head = pb.adapter, pb.layers, pb.layer_ids, pb.targets, pb.head
    bsz = t.hidden.shape[0]
    saved, prob, ctx = prefix_pass(model, adapter, enc, t, head, layer_ids)
    layers_above = sum(len(enc) - 1 - l for l in layer_ids) / len(layer_ids)
    groups, points = passes(layer_ids, m, bsz, max_copies or auto_max_copies(t.hidden, layers_above))
    alphas = pb.alphas.to(t.hidden.dtype).to(t.hidden.device)
    prefix, w2s, grads = {}, {}, {l: [] for l in layer_ids}
    for l in layer_ids:
        a_t, h_l, v_t = saved[l]
        site = adapter.ffn_site(enc[l])
        w2s[l], b2 = site.linear_weight(site.down), site.down.linear.bias  # W2 [d, I], b2 [d]
        # v_t W2^T [N, d], the part of FFN_out that scales with alpha
        prefix[l] = (v_t @ w2s[l].t(), 0.0 if b2 is None else b2, a_t, h_l)
    copies = _Copies(model, adapter, t, ctx)
    with frozen_eval(model):
        for group in groups:
            for k0 in range(0, m, points):
                for l, g in zip(group, _one_pass(copies, enc, head, prefix, group, alphas[k0 : k0 + points], autocast)):
                    grads[l].append(g)
        scores = [attribution_scores(torch.cat(grads[l]), pb.weights.to(t.hidden), w2s[l], saved[l][2])
                  for l in layer_ids]
    return Attribution(layer_ids, torch.stack(scores), prob, int(t.labels.numel()), bsz)
