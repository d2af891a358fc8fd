"""The fused batched attribution (`attribute`, paper eqs. 9-11); the design is in docs/routing.md.

The layers run once without gradients (the shared prefix), which gives every layer's attention
state a_l, output h_l and target-position neurons v_l. Since FFN_out = v W2^T + b2 is linear in
v, the m scaled copies differ only in F_k = alpha_k (v_t W2^T) + b2 at the target positions, a
[m, N, d] leaf; the copies start at layer l's output (LayerNorm(F_k + a_l) for post-LayerNorm
layers, per position), which differs from the prefix's output only at the targets: in layer l+1
the family adapter may reuse the prefix's work (`prefix_state` / `attention_patched`: for
BERT-style SDPA attention the q/k/v projections run only at the targets), and in the last layer
compute the attention state only at the targets (`attention_at`); the last layer's FFN runs only
there (all that P reads). One backward gives G_k = dP/dF_k; dP/dv at step k is G_k W2, so
Attr = v_t * ((sum_k w_k G_k) W2) summed over t, computed by `kernels.attribution` (no [m, N, I]
tensor). All sequences run together; the m points run as one batch of m * B copies, split into
chunks of at most `max_copies` sequence copies to bound memory (`auto_max_copies` by default: on a
GPU a refresh is bound by launches, and each chunk is one more pass over the upper layers).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from trelm_fast.kernels.attribution import attribution_scores
from trelm_fast.losses import MLMHead, cka_correct_prob_at
from trelm_fast.models import FamilyAdapter
from trelm_fast.routing.attribution import Attribution, empty_attribution, frozen_eval, prefix_pass, resolve_problem


CPU_MAX_COPIES = 64
"""Copies per chunk on CPU (auto): peak 608 MiB against 1589 MiB at 256, MiniLM, 8 x 128, m = 20."""
ACTIVATIONS_PER_LAYER = 16
"""[n, d] tensors a copy keeps per layer for the backward, as `auto_max_copies` counts them: q, k, v,
the attention output and its LayerNorm, the FFN's 4d input and output, and the layer's output."""


def auto_max_copies(hidden: Tensor, layers_above: int) -> int:
    """Sequence copies per chunk for max_copies = 0: `CPU_MAX_COPIES` on CPU; on CUDA as many as half
    the free GPU memory holds, at ACTIVATIONS_PER_LAYER [n, d] tensors of hidden's dtype per copy and
    layer above the attributed one (hidden [B, n, d])."""
    if not hidden.is_cuda:
        return CPU_MAX_COPIES
    free, _ = torch.cuda.mem_get_info(hidden.device)
    n, d = hidden.shape[1:]
    per_copy = ACTIVATIONS_PER_LAYER * n * d * max(1, layers_above) * hidden.element_size()
    return max(1, int(0.5 * free // per_copy))


def _run_layers(adapter: FamilyAdapter, layers, h: Tensor, ctx, start: int, rows: Tensor, cols: Tensor,
                h_t=None, state=None) -> Tensor:
    """Layers start.. on h [C, n, d] with layer context `ctx`; returns the final hidden states at
    (rows, cols) only, [N, d]. With `state` (the adapter's `prefix_state` of layer `start`), h is
    the prefix with h_t at (rows, cols) and layer start's attention reuses the prefix's work.

    The last layer's FFN runs only at those positions (attention still sees every position).
    """
    for j in range(start, len(layers)):
        if j == start and state is not None and j < len(layers) - 1:
            a = adapter.attention_patched(layers[j], h, ctx, rows, cols, h_t, state)
        elif j == len(layers) - 1:
            a = adapter.attention_at(layers[j], h, ctx, rows, cols)
        else:
            a = adapter.attention(layers[j], h, ctx)
        h = adapter.ffn_out(layers[j], adapter.neurons(layers[j], a), a)
    return h


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
    sequence copies per forward/backward chunk (memory), not the result (0: `auto_max_copies`). `autocast` (e.g.
    torch.bfloat16) runs the scaled copies under torch.autocast; the prefix, the leaf gradients and
    the step reduction stay in the model's precision.
    """
    pb = resolve_problem(model, hidden, attention_mask, cka_labels, negatives, m, quadrature_rule, layers, sequences,
                         head)
    if pb.targets.labels.numel() == 0:
        return empty_attribution(pb.layer_ids, pb.width, hidden.device)
    adapter, enc, layer_ids, t, head, weights = pb.adapter, pb.layers, pb.layer_ids, pb.targets, pb.head, pb.weights
    bsz = t.hidden.shape[0]
    if max_copies < 0:
        raise ValueError(f"routing.max_copies must be >= 0 (0 = auto), got {max_copies}")
    chunk = max(1, (max_copies or auto_max_copies(t.hidden, len(enc) - 1 - min(layer_ids))) // bsz)
    alphas = pb.alphas.to(t.hidden.dtype).to(t.hidden.device)
    scores = []
    saved, prob = prefix_pass(model, adapter, enc, t, head, layer_ids)
    contexts = {}  # chunk size -> layer context (attention mask) of the chunk's copies
    with frozen_eval(model):
        for l in layer_ids:
            a_t, h_l, v_t = saved.pop(l)
            site = adapter.ffn_site(enc[l])
            w2, b2 = site.linear_weight(site.down), site.down.linear.bias  # W2 [d, I], b2 [d]
            u_t = v_t @ w2.t()  # [N, d]: v_t W2^T, the part of FFN_out that scales with alpha
            b2 = 0.0 if b2 is None else b2
            grads = []
            for k0 in range(0, m, chunk):
                c = min(chunk, m - k0)
                leaf = (alphas[k0 : k0 + c, None, None] * u_t + b2).requires_grad_(True)  # [c, N, d]
                rows = (torch.arange(c, device=t.rows.device)[:, None] * bsz + t.rows).reshape(-1)
                cols = t.cols.repeat(c)
                with torch.autocast(t.hidden.device.type, dtype=autocast, enabled=autocast is not None):
                    # the layer output is per position: only the target positions differ from the prefix's h_l
                    h_t = adapter.layer_output(enc[l], leaf, a_t)
                    if l < len(enc) - 1:
                        h0 = h_l.repeat(c, 1, 1).to(h_t.dtype)
                        h0[rows, cols] = h_t.reshape(-1, h_t.shape[-1])
                        if c not in contexts:
                            contexts[c] = adapter.layer_context(model, t.mask.repeat(c, 1), h0)
                        ctx = contexts[c]
                        state = adapter.prefix_state(enc[l + 1], h_l, ctx) if l + 1 < len(enc) - 1 else None
                        h_t = h_t.reshape(-1, h_t.shape[-1])
                        h_t = _run_layers(adapter, enc, h0, ctx, l + 1, rows, cols, h_t, state)
                    final = adapter.final_norm(model, h_t.view(c, -1, h_t.shape[-1]))
                    p = cka_correct_prob_at(final, t.labels, t.negatives, head)
                (g,) = torch.autograd.grad(p.sum(), leaf)
                grads.append(g)
            g_all = torch.cat(grads)
            scores.append(attribution_scores(g_all, weights.to(g_all), w2, v_t))
    return Attribution(layer_ids, torch.stack(scores), prob, int(t.labels.numel()), bsz)

