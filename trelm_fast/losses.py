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

Positions are always taken in row-major order of `labels.ne(-100).nonzero()`, so negatives [N, K]
line up with the flattened labelled positions.
"""
from __future__ import annotations

from dataclasses import dataclass

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
        t = self.transform(h)
        w = self.weight[tokens]  # [N, C, d]
        return torch.einsum("...nd,ncd->...nc", t, w) + self.bias[tokens]


def labelled_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows [N], cols [N], target ids [N]) of positions with label != -100, row-major."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, n], got shape {tuple(labels.shape)}")
    rows, cols = labels.ne(IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, labels[rows, cols]


def _check_hidden(hidden: Tensor, labels: Tensor, name: str) -> None:
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"{name}: hidden must be [B, n, d] matching labels [B, n]; got hidden {tuple(hidden.shape)}, "
            f"labels {tuple(labels.shape)}"
        )


def mlm_loss(hidden: Tensor, labels: Tensor, head: MLMHead) -> Tensor:
    """Mean cross-entropy over positions with label != -100; logits only there. 0 if none are labelled."""
    _check_hidden(hidden, labels, "mlm_loss")
    rows, cols, targets = labelled_positions(labels)
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    logits = head.logits(hidden[rows, cols])  # [N, V]
    return F.cross_entropy(logits.float(), targets)


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


def sample_negatives(
    targets: Tensor,
    q: Tensor,
    num_negatives: int,
    generator: torch.Generator | None = None,
    max_resample: int = 16,
) -> Tensor:
    """K negatives per target, y' ~ Q, [N] -> [N, K] int64; collisions with the target are resampled.

    After `max_resample` rounds any remaining collision is left in place; the scoring functions
    mask collisions out (so a Q concentrated on one token cannot loop forever).
    """
    if q.dim() != 1 or bool((q < 0).any()) or float(q.sum()) <= 0:
        raise ValueError("sample_negatives: q must be a non-negative [V] probability vector with positive mass")
    if num_negatives < 1:
        raise ValueError(f"sample_negatives: num_negatives must be >= 1, got {num_negatives}")
    n = targets.numel()
    q_cpu = q.detach().double().cpu()

    def draw(k: int) -> Tensor:
        return torch.multinomial(q_cpu, k, replacement=True, generator=generator)

    neg = draw(n * num_negatives).view(n, num_negatives)
    tgt = targets.detach().cpu().view(n, 1)
    for _ in range(max_resample):
        clash = neg.eq(tgt)
        count = int(clash.sum())
        if count == 0:
            break
        neg[clash] = draw(count)
    return neg.to(targets.device)


def cka_logits(hidden_at: Tensor, targets: Tensor, negatives: Tensor, head: MLMHead) -> Tensor:
    """Sampled-softmax logits [.., N, 1+K] for hidden states at the labelled positions [.., N, d].

    Column 0 scores the true token; columns 1..K the negatives; negatives equal to the true token
    get -inf.
    """
    if negatives.dim() != 2 or negatives.shape[0] != targets.shape[0]:
        raise ValueError(
            f"negatives must be [N, K] with N = {targets.shape[0]} labelled positions, got {tuple(negatives.shape)}"
        )
    tokens = torch.cat([targets[:, None], negatives], dim=1)
    logits = head.scores(hidden_at, tokens).float()
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
    rows, cols, targets = labelled_positions(labels)
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    logits = cka_logits(hidden[rows, cols], targets, negatives, head)
    return -torch.log_softmax(logits, dim=-1)[:, 0].mean()


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
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"trelm_loss: theta must be in [0, 1], got {theta}")
    mlm = mlm_loss(hidden, mlm_labels, head)
    cka = cka_loss(hidden, cka_labels, negatives, head)
    return LossOutput(theta * mlm + (1.0 - theta) * cka, mlm, cka)
