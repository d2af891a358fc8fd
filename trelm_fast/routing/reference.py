"""The reference attribution (`attribute_reference`): Knowledge Neurons style, the test oracle and
the `trelm_naive` baseline. Same quantity as `routing.fused.attribute`, the slow way."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from trelm_fast.losses import MLMHead, cka_correct_prob_at
from trelm_fast.routing.attribution import Attribution, empty_attribution, frozen_eval, prefix_pass, resolve_problem


def attribute_reference(
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
) -> Attribution:
    """The same quantity as `attribute`, the slow way (Knowledge Neurons style; `trelm_naive`).

    Per attributed layer and per sequence: m scaled copies run the whole model from the
    embeddings, v at the target positions is replaced by a leaf alpha_k v [m, T, I], and autograd
    gives dP/dv directly; Attr = v * sum_k w_k dP/dv, summed over positions.
    """
    pb = resolve_problem(model, hidden, attention_mask, cka_labels, negatives, m, quadrature_rule, layers, sequences,
                         head)
    if pb.targets.labels.numel() == 0:
        return empty_attribution(pb.layer_ids, pb.width, hidden.device)
    adapter, enc, layer_ids, t, head = pb.adapter, pb.layers, pb.layer_ids, pb.targets, pb.head
    alphas, weights = pb.alphas.to(t.hidden), pb.weights.to(t.hidden)
    scores = torch.zeros(len(layer_ids), pb.width, dtype=torch.float32, device=hidden.device)
    _, prob, _ = prefix_pass(model, adapter, enc, t, head, ())
    with frozen_eval(model):
        for li, l in enumerate(layer_ids):
            for b in range(t.hidden.shape[0]):
                sel = t.rows == b
                cols = t.cols[sel]
                h = t.hidden[b : b + 1].expand(m, -1, -1)
                mask2d = t.mask[b : b + 1].expand(m, -1)
                ctx = adapter.layer_context(model, mask2d, h)
                for j, layer in enumerate(enc):
                    a = adapter.attention(layer, h, ctx)
                    v = adapter.neurons(layer, a)
                    if j == l:
                        v_t = v[:, cols].detach()  # [m, T, I], identical copies
                        scaled = (alphas[:, None, None] * v_t).requires_grad_(True)
                        v = v.clone()
                        v[:, cols] = scaled.to(v.dtype)  # v is bf16 under autocast; the leaf stays fp32
                    h = adapter.ffn_out(layer, v, a)
                final = adapter.final_norm(model, h[:, cols])
                p = cka_correct_prob_at(final, t.labels[sel], t.negatives[sel], head)  # [m, T]
                (g,) = torch.autograd.grad(p.sum(), scaled)
                scores[li] += (v_t[0] * (weights[:, None, None] * g).sum(0)).sum(0).float()
    return Attribution(layer_ids, scores, prob, int(t.labels.numel()), t.hidden.shape[0])

