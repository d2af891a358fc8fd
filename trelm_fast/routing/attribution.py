"""What both attribution engines share: the target positions, the result, the model access.

Notation: B sequences of n tokens, hidden size d, FFN size I, N target positions (the
CKA-labelled positions, `cka_labels != -100`), K negatives.

The neurons of FFN layer l are v = act(W1 a + b1) [.., I] (a: the layer's attention output); the
layer output is LayerNorm(v W2^T + b2 + a). P (eq. 9) = sum over the target positions of the
probability of the true token under the CKA sampled softmax (`losses.cka_correct_prob_at`).
Both engines run with dropout off and the parameters frozen (`frozen_eval`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from trelm_fast.ffn import suspended_paths
from trelm_fast.losses import IGNORE_INDEX, MLMHead, cka_correct_prob_at


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise TypeError(f"routing: {type(model).__name__} has no `encoder.layer` (expected a BERT/RoBERTa MLM model)")
    return layers


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


def layer_mask(model: nn.Module, mask2d: Tensor, like: Tensor):
    """The layer attention mask HF builds for a [B, n] padding mask (None, 4D tensor or block mask)."""
    return create_bidirectional_mask(config=model.config, inputs_embeds=like, attention_mask=mask2d)


def attention(layer: nn.Module, h: Tensor, mask) -> Tensor:
    return layer.attention(h, mask)[0]



def neurons(layer: nn.Module, a: Tensor) -> Tensor:
    """v = act(W1 a + b1): post-activation FFN intermediate values [.., I]."""
    return layer.intermediate.intermediate_act_fn(layer.intermediate.dense(a))


def ffn_out(layer: nn.Module, v: Tensor, a: Tensor) -> Tensor:
    """LayerNorm(v W2^T + b2 + a): the layer output given neurons v and attention output a."""
    return layer.output.LayerNorm(layer.output.dense(v) + a)



@dataclass
class Targets:
    hidden: Tensor  # [B', n, d] embedding output of the attributed sequences
    mask: Tensor  # [B', n]
    rows: Tensor  # [N] row in the B' sequences
    cols: Tensor  # [N]
    labels: Tensor  # [N] true token ids
    negatives: Tensor  # [N, K]


def select_targets(hidden: Tensor, attention_mask: Tensor, cka_labels: Tensor, negatives: Tensor, sequences: int) -> Targets:
    """Keep the sequences with targets (the first `sequences` of them when > 0) and their positions."""
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2] or cka_labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"routing: hidden must be [B, n, d] with attention_mask and cka_labels [B, n]; got {tuple(hidden.shape)}, "
            f"{tuple(attention_mask.shape)}, {tuple(cka_labels.shape)}"
        )
    labelled = cka_labels.ne(IGNORE_INDEX)
    if negatives.dim() != 2 or negatives.shape[0] != int(labelled.sum()):
        raise ValueError(
            f"routing: negatives must be [N, K] with N = {int(labelled.sum())} CKA-labelled positions, "
            f"got {tuple(negatives.shape)}"
        )
    if sequences < 0:
        raise ValueError(f"routing.sequences must be >= 0 (0 = all), got {sequences}")
    keep = labelled.any(1).nonzero().squeeze(1)
    if sequences > 0:
        keep = keep[:sequences]
    pos_row = labelled.nonzero()[:, 0]
    negatives = negatives[torch.isin(pos_row, keep)]
    rows, cols = labelled[keep].nonzero(as_tuple=True)
    labels = cka_labels[keep][rows, cols]
    return Targets(hidden.detach()[keep], attention_mask[keep], rows, cols, labels, negatives)


@dataclass
class Attribution:
    """Neuron scores per attributed layer: scores [len(layers), I] fp32, summed over target positions.

    prob: mean P_x over the attributed target positions at the model's own values (alpha = 1);
    num_targets: N; num_sequences: sequences attributed.
    """

    layers: tuple[int, ...]
    scores: Tensor
    prob: float
    num_targets: int
    num_sequences: int


def empty_attribution(layers: tuple[int, ...], model: nn.Module, device) -> Attribution:
    width = encoder_layers(model)[0].output.dense.weight.shape[1]
    return Attribution(layers, torch.zeros(len(layers), width, device=device), float("nan"), 0, 0)



def prefix_pass(model, enc, t: Targets, head: MLMHead, keep) -> tuple[dict, float]:
    """One pass without gradients: {layer: (attention out a at targets, layer output h, v at targets)}
    for the layers in `keep`, and the mean P_x at the model's own values."""
    saved = {}
    with frozen_eval(model), torch.no_grad():
        mask = layer_mask(model, t.mask, t.hidden)
        h = t.hidden
        for j, layer in enumerate(enc):
            a = attention(layer, h, mask)
            v = neurons(layer, a)
            h = layer.output.LayerNorm(layer.output.dense(v) + a)
            if j in keep:
                saved[j] = (a[t.rows, t.cols], h, v[t.rows, t.cols])
        prob = cka_correct_prob_at(h[t.rows, t.cols], t.labels, t.negatives, head).mean().item()
    return saved, prob
