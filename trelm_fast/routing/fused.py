"""The fused batched attribution (`attribute`, paper eqs. 9-11); the design is in docs/routing.md.

The layers run once without gradients (the shared prefix), which gives every layer's attention
output a_l, output h_l and target-position neurons v_l. Since FFN_out = v W2^T + b2 is linear in
v, the m scaled copies differ only in F_k = alpha_k (v_t W2^T) + b2 at the target positions, a
[m, N, d] leaf; the copies start at layer l's output LayerNorm(F_k + a_l), which differs from the
prefix's output only at the targets: in layer l+1 the q/k/v projections run only there (BERT-style
SDPA attention, else the plain layer). The last layer's attention queries, output projection and
FFN run only at the targets (all that P reads). One backward gives G_k = dP/dF_k; dP/dv at step k
is G_k W2, so Attr = v_t * ((sum_k w_k G_k) W2) summed over t, computed by `kernels.attribution`
(no [m, N, I] tensor). All sequences run together; the m points run as one batch of m * B copies,
split into chunks of at most `max_copies` sequence copies to bound memory.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from trelm_fast.kernels.attribution import attribution_scores
from trelm_fast.losses import MLMHead, cka_correct_prob_at
from trelm_fast.routing.attribution import (
    Attribution,
    attention,
    empty_attribution,
    encoder_layers,
    ffn_out,
    frozen_eval,
    layer_mask,
    neurons,
    prefix_pass,
    resolve_layers,
    select_targets,
)
from trelm_fast.routing.quadrature import quadrature


def _attention_at(layer: nn.Module, h: Tensor, mask, rows: Tensor, cols: Tensor) -> Tensor:
    """The attention output at (rows, cols) only, [N, d]. For a HF attention block (`self` then
    `output` = LayerNorm(dense(ctx) + h), both per position) the output projection and LayerNorm
    run only at those positions; otherwise the full output is indexed."""
    attn = layer.attention
    if _plain_sdpa(layer, mask):  # queries only at the targets, padded to the most per sequence
        sa = attn.self
        C, n, d = h.shape
        hd = sa.attention_head_size
        counts = torch.bincount(rows, minlength=C)
        slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
        tmax = int(counts.max())
        h_t = h[rows, cols]
        q_t = sa.query(h_t)
        q = q_t.new_zeros(C, tmax, d).index_put((rows, slot), q_t).view(C, tmax, -1, hd).transpose(1, 2)
        k = sa.key(h).view(C, n, -1, hd).transpose(1, 2)
        v = sa.value(h).view(C, n, -1, hd).transpose(1, 2)
        if mask is not None:
            qcols = torch.zeros(C, tmax, dtype=torch.long, device=rows.device).index_put((rows, slot), cols)
            full = mask.expand(C, mask.shape[1], n, n)
            mask = full[torch.arange(C, device=rows.device)[:, None], :, qcols].transpose(1, 2)  # [C, h, tmax, n]
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sa.scaling)
        ctx = ctx.transpose(1, 2).reshape(C, tmax, d)[rows, slot]
        return attn.output(ctx, h_t)
    if isinstance(getattr(attn, "self", None), nn.Module) and isinstance(getattr(attn, "output", None), nn.Module):
        ctx = attn.self(h, attention_mask=mask)[0]
        return attn.output(ctx[rows, cols], h[rows, cols])
    return attention(layer, h, mask)[rows, cols]



def _plain_sdpa(layer: nn.Module, mask) -> bool:
    """Whether the layer's self-attention is HF's BERT-style q/k/v Linear + SDPA (then the first
    layer above the attributed one may reuse the prefix's q/k/v at the unchanged positions)."""
    sa = getattr(layer.attention, "self", None)
    return (
        isinstance(getattr(layer.attention, "output", None), nn.Module)
        and all(isinstance(getattr(sa, name, None), nn.Linear) for name in ("query", "key", "value"))
        and getattr(getattr(sa, "config", None), "_attn_implementation", None) == "sdpa"
        and hasattr(sa, "scaling") and hasattr(sa, "attention_head_size")
        and (mask is None or isinstance(mask, Tensor))
    )


def _qkv_prefix(layer: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The layer's q, k, v projections [B, n, d] of the prefix hidden states h (no gradients)."""
    sa = layer.attention.self
    with torch.no_grad():
        return sa.query(h), sa.key(h), sa.value(h)


def _attention_patched(layer: nn.Module, h: Tensor, mask, rows: Tensor, cols: Tensor, h_t: Tensor, qkv) -> Tensor:
    """The attention output of h [C, n, d] (prefix copies with h_t [N, d] at (rows, cols)) given the
    prefix's q, k, v [B, n, d]: the projections run only at the changed positions."""
    sa = layer.attention.self
    c = h.shape[0] // qkv[0].shape[0]
    heads = []
    for proj, base in zip((sa.query, sa.key, sa.value), qkv):
        y = proj(h_t)
        x = base.repeat(c, 1, 1).to(y.dtype)
        x[rows, cols] = y
        heads.append(x.view(*h.shape[:2], -1, sa.attention_head_size).transpose(1, 2))
    ctx = torch.nn.functional.scaled_dot_product_attention(*heads, attn_mask=mask, scale=sa.scaling)
    return layer.attention.output(ctx.transpose(1, 2).reshape(h.shape), h)


def _run_layers(layers, h: Tensor, mask, start: int, rows: Tensor, cols: Tensor, h_t=None, qkv=None) -> Tensor:
    """Layers start.. on h [C, n, d] with layer attention mask `mask`; returns the final hidden
    states at (rows, cols) only, [N, d]. With qkv (the prefix's q, k, v of layer `start`), h is the
    prefix with h_t at (rows, cols) and layer start's projections run only there.

    The last layer's FFN runs only at those positions (attention still sees every position).
    """
    for j in range(start, len(layers)):
        if j == start and qkv is not None and j < len(layers) - 1:
            a = _attention_patched(layers[j], h, mask, rows, cols, h_t, qkv)
        elif j == len(layers) - 1:
            a = _attention_at(layers[j], h, mask, rows, cols)
        else:
            a = attention(layers[j], h, mask)
        h = ffn_out(layers[j], neurons(layers[j], a), a)
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
    max_copies: int = 64,
    autocast: torch.dtype | None = None,
) -> Attribution:
    """Fused batched IG attribution (eqs. 9-11) for the FFN layers `layers` (None: all).

    hidden: embedding output [B, n, d] (with knowledge injection); attention_mask, cka_labels
    [B, n]; negatives [N, K] for the CKA-labelled positions in row-major order. `sequences` > 0
    attributes only the first that many sequences that have targets. `max_copies` bounds the
    sequence copies per forward/backward chunk (memory), not the result. `autocast` (e.g.
    torch.bfloat16) runs the scaled copies under torch.autocast; the prefix, the leaf gradients and
    the step reduction stay in the model's precision.
    """
    enc = encoder_layers(model)
    layer_ids = resolve_layers(layers, len(enc))
    alphas, weights = quadrature(m, quadrature_rule)
    t = select_targets(hidden, attention_mask, cka_labels, negatives, sequences)
    if t.labels.numel() == 0:
        return empty_attribution(layer_ids, model, hidden.device)
    head = head or MLMHead.from_model(model)
    bsz = t.hidden.shape[0]
    chunk = max(1, max_copies // bsz)
    alphas = alphas.to(t.hidden.dtype).to(t.hidden.device)
    scores = []
    saved, prob = prefix_pass(model, enc, t, head, layer_ids)
    masks = {}  # chunk size -> layer attention mask of the chunk's copies
    with frozen_eval(model):
        for l in layer_ids:
            a_t, h_l, v_t = saved.pop(l)
            w2 = enc[l].output.dense
            u_t = v_t @ w2.weight.t()  # [N, d]: v_t W2^T, the part of FFN_out that scales with alpha
            b2 = 0.0 if w2.bias is None else w2.bias
            grads = []
            for k0 in range(0, m, chunk):
                c = min(chunk, m - k0)
                leaf = (alphas[k0 : k0 + c, None, None] * u_t + b2).requires_grad_(True)  # [c, N, d]
                rows = (torch.arange(c, device=t.rows.device)[:, None] * bsz + t.rows).reshape(-1)
                cols = t.cols.repeat(c)
                with torch.autocast(t.hidden.device.type, dtype=autocast, enabled=autocast is not None):
                    # LayerNorm is per position: only the target positions differ from the prefix's h_l
                    h_t = enc[l].output.LayerNorm(leaf + a_t)
                    if l < len(enc) - 1:
                        h0 = h_l.repeat(c, 1, 1).to(h_t.dtype)
                        h0[rows, cols] = h_t.reshape(-1, h_t.shape[-1])
                        if c not in masks:
                            masks[c] = layer_mask(model, t.mask.repeat(c, 1), h0)
                        nxt = enc[l + 1]
                        qkv = _qkv_prefix(nxt, h_l) if _plain_sdpa(nxt, masks[c]) else None
                        h_t = _run_layers(enc, h0, masks[c], l + 1, rows, cols, h_t.reshape(-1, h_t.shape[-1]), qkv)
                    p = cka_correct_prob_at(h_t.view(c, -1, h_t.shape[-1]), t.labels, t.negatives, head)
                (g,) = torch.autograd.grad(p.sum(), leaf)
                grads.append(g)
            g_all = torch.cat(grads)
            scores.append(attribution_scores(g_all, weights.to(g_all), w2.weight, v_t))
    return Attribution(layer_ids, torch.stack(scores), prob, int(t.labels.numel()), bsz)

