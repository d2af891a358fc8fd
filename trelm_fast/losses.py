"""TRELM training losses: MLM at labelled positions only and the CKA sampled softmax (eqs. 2, 3).

Shapes: B sequences of n tokens, hidden size d, vocabulary V, N labelled positions, K negatives.

- `MLMHead` gives one view of the MLM output head of a masked LM of any supported family
  (`trelm_fast.models`): `transform(h)` (e.g. dense, activation, LayerNorm) then
  logits = transform(h) W^T + b, with W [V, d] tied to the word embeddings and b [V] the output bias.
- `mlm_loss` gathers the positions whose label is not -100 and computes logits only there
  ([N, V] instead of [B, n, V]).
- CKA (eq. 2) is a token-level sampled softmax: at each CKA-labelled position, the score of the
  true token y, f(h, y) = transform(h) . W[y] + b[y], against K negatives y' ~ Q. Q is a
  probability vector over the vocabulary (`negative_distribution` builds the default: token
  frequencies of entity names). Negatives that equal the true token are resampled a few times and
  masked out (score -inf) if they still collide, so the true token never competes with itself.
- `cka_correct_prob` is P_x of eq. 9: the probability of the true token under that sampled softmax.
- `trelm_loss` returns theta * MLM + (1 - theta) * CKA (eq. 3).
- `trelm_loss_at` is the same from flat labelled positions computed on the host
  (`labelled_flat`, `trelm_fast.data.prepare`): the training step's form, which asks the device no
  question (no boolean mask, no `nonzero`), gathers the MLM and CKA positions in one index_select
  and runs the head's transform once over both.

The `_at` forms take optional per-row weights (1 / N_real for the real rows, 0 for padding: the
padded rows of a batch with static shapes, `trelm_fast.data.prepare.pad_static`): the loss is then
sum(w * loss), the mean over the real rows (0 when there are none), and a padding row adds exactly
0 to it and to every gradient.

Positions are always taken in row-major order of `labels.ne(-100).nonzero()`, so negatives [N, K]
line up with the flattened labelled positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


@dataclass
class MLMHead:
    """The MLM output head as `transform` [.., d] -> [.., d] plus output `weight` [V, d] and `bias` [V].

    Holds references to the model's own parameters (nothing is copied), so gradients flow into them.
    """

    transform: nn.Module
    decoder: nn.Linear
    bias: Tensor

    @classmethod
    def from_model(cls, model: nn.Module) -> "MLMHead":
        """The MLM head of a masked-LM model of a supported family (its adapter in `trelm_fast.models` knows where)."""
        from trelm_fast.models import adapter_for

        return adapter_for(model, "MLMHead.from_model").mlm_head(model)

    @property
    def weight(self) -> Tensor:
        """Output embedding W [V, d] (tied to the word embeddings)."""
        return self.decoder.weight

    @property
    def vocab_size(self) -> int:
        return self.decoder.weight.shape[0]

    def logits(self, h: Tensor) -> Tensor:
        """Full-vocabulary logits [.., V] for hidden states h [.., d]."""
        return F.linear(self.transform(h), self.weight, self.bias)

    def scores(self, h: Tensor, tokens: Tensor) -> Tensor:
        """f(h, y) = transform(h) . W[y] + b[y] for h [.., N, d], tokens [N, C] -> [.., N, C]."""
        return self.scores_transformed(self.transform(h), tokens)

    def scores_transformed(self, t: Tensor, tokens: Tensor) -> Tensor:
        """`scores` from t = transform(h) [.., N, d] already computed."""
        w = self.weight[tokens]  # [N, C, d]
        return torch.einsum("...nd,ncd->...nc", t, w) + self.bias[tokens]


def labelled_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows [N], cols [N], target ids [N]) of positions with label != -100, row-major."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, n], got shape {tuple(labels.shape)}")
    rows, cols = labels.ne(IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, labels[rows, cols]


def labelled_flat(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(flat positions [N] = row * n + col, targets [N]) of labels [B, n] != -100, row-major."""
    flat = labels.reshape(-1)
    pos = flat.ne(IGNORE_INDEX).nonzero().squeeze(1)
    return pos, flat[pos]


def _check_hidden(hidden: Tensor, labels: Tensor, name: str) -> None:
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"{name}: hidden must be [B, n, d] matching labels [B, n]; got hidden {tuple(hidden.shape)}, "
            f"labels {tuple(labels.shape)}"
        )


def mlm_loss(hidden: Tensor, labels: Tensor, head: MLMHead) -> Tensor:
    """Mean cross-entropy over positions with label != -100; logits only there. 0 if none are labelled."""
    _check_hidden(hidden, labels, "mlm_loss")
    return mlm_loss_at(hidden, *labelled_flat(labels), head)


def weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """values.mean() for weight None, else sum(weight * values) for values and weight [N] (weights
    1 / N_real for the real rows, 0 for padding: the mean over the real rows, 0 when there are none)."""
    if weight is None:
        return values.mean()
    return torch.dot(values, weight.to(values.dtype))


def _cross_entropy(logits: Tensor, targets: Tensor, weight: Tensor | None) -> Tensor:
    """Mean cross-entropy of logits [N, V] (fp32) against targets [N] (over the real rows: `weighted_mean`)."""
    if weight is None:
        return F.cross_entropy(logits, targets)
    return weighted_mean(F.cross_entropy(logits, targets, reduction="none"), weight)


def mlm_loss_at(hidden: Tensor, positions: Tensor, targets: Tensor, head: MLMHead,
                weight: Tensor | None = None) -> Tensor:
    """`mlm_loss` from flat labelled positions [N] (`labelled_flat`); 0 if there are none; ``weight``
    [N]: see the module docstring."""
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    return _cross_entropy(head.logits(h).float(), targets, weight)


def negative_distribution(token_ids: Tensor, vocab_size: int, power: float = 1.0) -> Tensor:
    """Q over the vocabulary [V]: token frequencies (raised to `power`) of `token_ids` (any shape).

    Pass the token ids of every entity-name occurrence in the corpus for the default CKA Q
    (frequency-weighted entity-name tokens); ids < 0 (padding) are ignored.
    """
    ids = token_ids.reshape(-1)
    ids = ids[ids >= 0]
    if ids.numel() == 0:
        raise ValueError("negative_distribution: token_ids holds no token (all padding or empty)")
    if int(ids.max()) >= vocab_size:
        raise ValueError(f"negative_distribution: token id {int(ids.max())} >= vocab_size {vocab_size}")
    counts = torch.bincount(ids, minlength=vocab_size).double().pow(power)
    return (counts / counts.sum()).float()


class NegativeSampler:
    """Draws K negatives per target from a fixed Q [V] by inverse CDF: uniforms searched into the
    cumulative Q, built once here (``torch.multinomial`` rebuilt it from Q at every call: 1.5 ms per
    step for V = 30522 on the host, where a GPU step is bound). Host tensors, float64 CDF."""

    def __init__(self, q: Tensor):
        if q.dim() != 1 or bool((q < 0).any()) or float(q.sum()) <= 0:
            raise ValueError("sample_negatives: q must be a non-negative [V] probability vector with positive mass")
        cdf = q.detach().double().cpu().cumsum(0)
        self.cdf = (cdf / cdf[-1]).numpy()  # last entry exactly 1, so an index past V - 1 cannot come out

    def draw(self, count: int, generator: torch.Generator | None = None) -> Tensor:
        """``count`` i.i.d. draws from Q, int64: P(i) = cdf[i] - cdf[i - 1] = Q_i / sum Q. The uniforms
        come from torch's ``generator``; numpy searches them (torch.searchsorted on CPU took 12 ms for
        3072 draws into V = 30522, numpy 0.2 ms)."""
        u = torch.rand(count, dtype=torch.float64, generator=generator)
        return torch.from_numpy(np.searchsorted(self.cdf, u.numpy(), side="right"))

    def __call__(self, targets: Tensor, num_negatives: int, generator: torch.Generator | None = None,
                 max_resample: int = 16) -> Tensor:
        """K negatives per target, y' ~ Q, [N] -> [N, K] int64 on the targets' device; collisions
        with the target are resampled. After ``max_resample`` rounds any remaining collision is left
        in place; the scoring functions mask collisions out (so a Q concentrated on one token cannot
        loop forever)."""
        if num_negatives < 1:
            raise ValueError(f"sample_negatives: num_negatives must be >= 1, got {num_negatives}")
        n = targets.numel()
        if n == 0:
            return torch.zeros(0, num_negatives, dtype=torch.long, device=targets.device)
        neg = self.draw(n * num_negatives, generator).view(n, num_negatives)
        tgt = targets.detach().cpu().view(n, 1)
        for _ in range(max_resample):
            clash = neg.eq(tgt)
            count = int(clash.sum())
            if count == 0:
                break
            neg[clash] = self.draw(count, generator)
        return neg.to(targets.device)


def sample_negatives(targets: Tensor, q: Tensor, num_negatives: int, generator: torch.Generator | None = None,
                     max_resample: int = 16) -> Tensor:
    """One-off `NegativeSampler(q)(targets, num_negatives, generator, max_resample)`; a step that draws
    from the same Q every time keeps a NegativeSampler."""
    return NegativeSampler(q)(targets, num_negatives, generator, max_resample)


def cka_logits(hidden_at: Tensor, targets: Tensor, negatives: Tensor, head: MLMHead) -> Tensor:
    """Sampled-softmax logits [.., N, 1+K] for hidden states at the labelled positions [.., N, d].

    Column 0 scores the true token; columns 1..K the negatives; negatives equal to the true token
    get -inf.
    """
    if negatives.dim() != 2 or negatives.shape[0] != targets.shape[0]:
        raise ValueError(
            f"negatives must be [N, K] with N = {targets.shape[0]} labelled positions, got {tuple(negatives.shape)}"
        )
    return _cka_logits(head.transform(hidden_at), targets, negatives, head)


def _cka_logits(t: Tensor, targets: Tensor, negatives: Tensor, head: MLMHead) -> Tensor:
    """`cka_logits` from t = transform(hidden_at) already computed."""
    tokens = torch.cat([targets[:, None], negatives], dim=1)
    logits = head.scores_transformed(t, tokens).float()
    clash = F.pad(negatives.eq(targets[:, None]), (1, 0))
    return logits.masked_fill(clash, float("-inf"))


def cka_correct_prob_at(hidden_at: Tensor, targets: Tensor, negatives: Tensor, head: MLMHead) -> Tensor:
    """P_x (eq. 9) per labelled position [.., N] from hidden states at those positions [.., N, d]."""
    return torch.softmax(cka_logits(hidden_at, targets, negatives, head), dim=-1)[..., 0]


def cka_correct_prob(hidden: Tensor, labels: Tensor, negatives: Tensor, head: MLMHead) -> Tensor:
    """P_x (eq. 9) at every CKA-labelled position, [N], for hidden [B, n, d] and labels [B, n]."""
    _check_hidden(hidden, labels, "cka_correct_prob")
    rows, cols, targets = labelled_positions(labels)
    return cka_correct_prob_at(hidden[rows, cols], targets, negatives, head)


def cka_loss(hidden: Tensor, labels: Tensor, negatives: Tensor, head: MLMHead) -> Tensor:
    """Eq. 2 averaged over CKA-labelled positions: mean of -log softmax(logits)[true]. 0 if none."""
    _check_hidden(hidden, labels, "cka_loss")
    return cka_loss_at(hidden, *labelled_flat(labels), negatives, head)


def cka_loss_at(hidden: Tensor, positions: Tensor, targets: Tensor, negatives: Tensor, head: MLMHead,
                weight: Tensor | None = None) -> Tensor:
    """`cka_loss` from flat labelled positions [N] (`labelled_flat`) and their negatives [N, K]; 0 if
    none; ``weight`` [N]: see the module docstring."""
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    logits = cka_logits(h, targets, negatives, head)
    return weighted_mean(-torch.log_softmax(logits, dim=-1)[:, 0], weight)


@dataclass
class LossOutput:
    """total = theta * mlm + (1 - theta) * cka (eq. 3); the parts are detached-free scalars."""

    total: Tensor
    mlm: Tensor
    cka: Tensor


def trelm_loss(
    hidden: Tensor,
    mlm_labels: Tensor,
    cka_labels: Tensor,
    negatives: Tensor,
    head: MLMHead,
    theta: float = 0.5,
) -> LossOutput:
    """Eq. 3 over final hidden states [B, n, d]; negatives [N_cka, K] for the CKA-labelled positions."""
    _check_hidden(hidden, mlm_labels, "trelm_loss")
    _check_hidden(hidden, cka_labels, "trelm_loss")
    return trelm_loss_at(hidden, *labelled_flat(mlm_labels), *labelled_flat(cka_labels), negatives, head, theta)


def trelm_loss_at(
    hidden: Tensor,
    mlm_positions: Tensor,
    mlm_targets: Tensor,
    cka_positions: Tensor,
    cka_targets: Tensor,
    negatives: Tensor,
    head: MLMHead,
    theta: float = 0.5,
    mlm_weight: Tensor | None = None,
    cka_weight: Tensor | None = None,
) -> LossOutput:
    """Eq. 3 from flat labelled positions (`labelled_flat` of each label tensor) into hidden [B, n, d].

    Equals `trelm_loss(hidden, mlm_labels, cka_labels, ...)`; the counts N_mlm and N_cka come from
    the index shapes (host metadata), so nothing here waits for the device. ``mlm_weight`` [N_mlm],
    ``cka_weight`` [N_cka]: 1 / N_real for real rows, 0 for padding (module docstring).
    """
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"trelm_loss: theta must be in [0, 1], got {theta}")
    if negatives.dim() != 2 or negatives.shape[0] != cka_targets.shape[0]:
        raise ValueError(f"negatives must be [N, K] with N = {cka_targets.shape[0]} labelled positions, "
                         f"got {tuple(negatives.shape)}")
    n_mlm, n_cka = mlm_targets.numel(), cka_targets.numel()
    flat = hidden.reshape(-1, hidden.shape[-1])
    t = head.transform(flat.index_select(0, torch.cat([mlm_positions, cka_positions])))
    zero = hidden.sum() * 0.0 if n_mlm == 0 or n_cka == 0 else None
    mlm = _cross_entropy(F.linear(t[:n_mlm], head.weight, head.bias).float(), mlm_targets, mlm_weight) \
        if n_mlm else zero
    if n_cka:
        logits = _cka_logits(t[n_mlm:], cka_targets, negatives, head)
        cka = weighted_mean(-torch.log_softmax(logits, dim=-1)[:, 0], cka_weight)
    else:
        cka = zero
    return LossOutput(theta * mlm + (1.0 - theta) * cka, mlm, cka)
