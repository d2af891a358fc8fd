"""What both attribution engines share: the target positions, the result, the model access.

Notation: B sequences of n tokens, hidden size d, FFN size I, N target positions (the
CKA-labelled positions, `cka_labels != -100`), K negatives.

The neurons of FFN layer l are v = act(W1 a + b1) [.., I] (a: the state the FFN reads, for
BERT-style layers the attention block's output); the layer output is the family's combination of
v W2^T + b2 with a (LayerNorm(v W2^T + b2 + a) for BERT-style layers). The model is reached through
its family adapter (`trelm_fast.models`). P (eq. 9) = sum over the target positions of the
probability of the true token under the CKA sampled softmax (`losses.cka_correct_prob_at`).
Both engines run with dropout off and the parameters frozen (`frozen_eval`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trelm_fast.ffn import suspended_paths
from trelm_fast.losses import IGNORE_INDEX, MLMHead, cka_correct_prob_at
from trelm_fast.models import FamilyAdapter, adapter_for
from trelm_fast.models.base import Positions
from trelm_fast.routing.quadrature import quadrature


def model_layers(model: nn.Module) -> tuple[FamilyAdapter, nn.ModuleList]:
    """The family adapter of `model` (docs/models.md) and its Transformer layers."""
    adapter = adapter_for(model, "routing")
    return adapter, adapter.layers(model)


def ffn_width(adapter: FamilyAdapter, layers: nn.ModuleList) -> int:
    """I, the FFN intermediate size (neurons per layer)."""
    return adapter.ffn_site(layers[0]).width


def resolve_layers(layers, num_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(num_layers))
    out = tuple(sorted(set(int(x) for x in layers)))
    if not out or out[0] < 0 or out[-1] >= num_layers:
        raise ValueError(f"routing.layers must be indices in [0, {num_layers}), got {list(layers)}")
    return out


@contextlib.contextmanager
def frozen_eval(model: nn.Module):
    """Eval mode (no dropout), requires_grad=False on every parameter and knowledge paths suspended
    (attribution passes need input gradients only, never the path-slice weight gradients); all
    restored on exit."""
    modes = [(mod, mod.training) for mod in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        with suspended_paths(model):
            yield
    finally:
        for mod, training in modes:
            mod.training = training
        for p, flag in grads:
            p.requires_grad_(flag)


@dataclass
class Targets:
    hidden: Tensor  # [B', n, d] embedding output of the attributed sequences
    mask: Tensor  # [B', n]
    at: Positions  # rows (in the B' sequences), cols, slot [N] and the most targets per sequence
    labels: Tensor  # [N] true token ids
    negatives: Tensor  # [N, K]

    @property
    def rows(self) -> Tensor:
        return self.at.rows

    @property
    def cols(self) -> Tensor:
        return self.at.cols


def true_indices(mask: Tensor, count: int) -> Tensor:
    """The indices of the True entries of a 1-D bool `mask`, in order, given their number `count`
    (known on the host): `mask.nonzero()` without the device sync that sizes its output (a stable sort)."""
    return torch.argsort(mask.logical_not().to(torch.int8), stable=True)[:count]


def select_targets(hidden: Tensor, attention_mask: Tensor, cka_labels: Tensor, negatives: Tensor, sequences: int,
                   causal: bool = False) -> Targets:
    """Keep the sequences with targets (the first `sequences` of them when > 0) and their positions.

    `causal` (decoders): the hidden state at t - 1 predicts the token at t, so the positions read
    (and scaled) are those before the targets; a target in column 0 has none and is dropped.
    One host read, the number of targets per sequence: the copies' shapes depend on it. Everything
    else stays on the device (`true_indices` where `nonzero` would sync again).
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2] or cka_labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"routing: hidden must be [B, n, d] with attention_mask and cka_labels [B, n]; got {tuple(hidden.shape)}, "
            f"{tuple(attention_mask.shape)}, {tuple(cka_labels.shape)}"
        )
    if sequences < 0:
        raise ValueError(f"routing.sequences must be >= 0 (0 = all), got {sequences}")
    labelled = cka_labels.ne(IGNORE_INDEX)
    read = labelled
    if causal:
        cka_labels = torch.cat([cka_labels[:, 1:], cka_labels.new_full((cka_labels.shape[0], 1), IGNORE_INDEX)], 1)
        read = cka_labels.ne(IGNORE_INDEX)  # the positions before the targets
    given, counts = torch.stack([labelled.sum(1), read.sum(1)]).tolist()  # the host read
    if negatives.dim() != 2 or negatives.shape[0] != sum(given):
        raise ValueError(
            f"routing: negatives must be [N, K] with N = {sum(given)} CKA-labelled positions, "
            f"got {tuple(negatives.shape)}"
        )
    if causal:  # drop the negatives of the targets in column 0
        pos = true_indices(labelled.flatten(), sum(given))
        negatives = negatives[true_indices(pos % labelled.shape[1] != 0, sum(counts))]
    kept = [c for c in counts if c][: sequences or None]  # targets of each kept sequence
    keep = true_indices(read.any(1), len(kept))  # the first sequences with targets, in order
    n_t = sum(kept)
    negatives = negatives[:n_t]  # row-major order: the kept sequences' targets come first
    read = read[keep]
    flat = true_indices(read.flatten(), n_t)
    rows, cols = flat // read.shape[1], flat % read.shape[1]
    per_seq = read.sum(1)
    slot = torch.arange(n_t, device=rows.device) - (torch.cumsum(per_seq, 0) - per_seq)[rows]
    at = Positions(rows, cols, slot, max(kept, default=0))
    return Targets(hidden.detach()[keep], attention_mask[keep], at, cka_labels[keep][rows, cols], negatives)


@dataclass
class Problem:
    """One attribution call's inputs, resolved for both engines: the family adapter and its layers,
    the attributed layer ids, the quadrature (alphas, weights [m] float64), the targets, the head
    (None when there are no targets) and I."""

    adapter: FamilyAdapter
    layers: nn.ModuleList
    layer_ids: tuple[int, ...]
    alphas: Tensor
    weights: Tensor
    targets: Targets
    head: MLMHead | None
    width: int


def resolve_problem(model: nn.Module, hidden: Tensor, attention_mask: Tensor, cka_labels: Tensor, negatives: Tensor,
                    m: int, quadrature_rule: str, layers, sequences: int, head: MLMHead | None) -> Problem:
    """Validate and resolve the arguments shared by `attribute` and `attribute_reference`."""
    adapter, enc = model_layers(model)
    layer_ids = resolve_layers(layers, len(enc))
    alphas, weights = quadrature(m, quadrature_rule)
    t = select_targets(hidden, attention_mask, cka_labels, negatives, sequences, adapter.causal)
    if t.labels.numel():
        head = head or adapter.mlm_head(model)
    return Problem(adapter, enc, layer_ids, alphas, weights, t, head, ffn_width(adapter, enc))


@dataclass
class Attribution:
    """Neuron scores per attributed layer: scores [len(layers), I] fp32, summed over target positions.

    mean_prob: mean P_x over the attributed target positions at the model's own values (alpha = 1),
    a 0-d tensor on the device (`prob` reads it: a host sync); num_targets: N; num_sequences:
    sequences attributed.
    """

    layers: tuple[int, ...]
    scores: Tensor
    mean_prob: Tensor
    num_targets: int
    num_sequences: int

    @property
    def prob(self) -> float:
        return float(self.mean_prob)


def empty_attribution(layers: tuple[int, ...], width: int, device) -> Attribution:
    """The result for a batch without targets: zero scores [len(layers), width], prob NaN."""
    return Attribution(layers, torch.zeros(len(layers), width, device=device),
                       torch.tensor(float("nan"), device=device), 0, 0)


def prefix_pass(model, adapter: FamilyAdapter, enc, t: Targets, head: MLMHead, keep) -> tuple[dict, Tensor, Any]:
    """One pass without gradients: {layer: (attention state a at targets, layer output h, v at
    targets)} for the layers in `keep`, the mean P_x at the model's own values (0-d, on the device)
    and the layer context of the B' sequences."""
    saved = {}
    with frozen_eval(model), torch.no_grad():
        ctx = adapter.layer_context(model, t.mask, t.hidden)
        h = t.hidden
        for j, layer in enumerate(enc):
            a = adapter.attention(layer, h, ctx)
            v = adapter.neurons(layer, a)
            h = adapter.ffn_out(layer, v, a)
            if j in keep:
                saved[j] = (a[t.rows, t.cols], h, v[t.rows, t.cols])
        final = adapter.final_norm(model, h[t.rows, t.cols])
        prob = cka_correct_prob_at(final, t.labels, t.negatives, head).mean()
    return saved, prob, ctx
