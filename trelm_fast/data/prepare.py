"""Host-side batch work: the index fields a training step needs, derived from the batch contract.

A GPU step must not ask the device how many labelled positions or spans a batch has (every such
question is a host synchronization: boolean-mask indexing, `nonzero`, `.item()`). The answers are
cheap on the host, so `prepare_batch` computes them on the CPU batch, in the DataLoader's workers
(`MLMCollator` calls it) or, for a batch that lacks them, in `TrainStep` before the batch is moved.

Fields added (B sequences of n tokens; N_mlm, N_cka labelled positions; P target-span tokens;
E entity spans; all int64 unless said):

| field | shape | meaning |
|---|---|---|
| `lengths` | [B] | real tokens per sequence (`attention_mask` is checked to be right-padded) |
| `mlm_positions`, `mlm_targets` | [N_mlm] | flat position row * n + col of the state that predicts each MLM label, row-major; its label |
| `cka_positions`, `cka_targets` | [N_cka] | the same for the CKA labels |
| `label_shift` | int | 0: a label at col is predicted by the state at col (masked LMs); 1: by the state at col - 1 (decoders) |
| `target_positions` | [3, P] | (target span index, row, col) of every target-span token, in span order |
| `entity_first` | bool [E] | span e is the first span of its (entity, sequence) pair, in span order |
| `entity_rounds` | int | the most spans one entity has in the batch (the bank applies duplicates in rounds) |
| `tokens` | int | real tokens in the batch |

Labels stay in token coordinates (the label at col is the token at col); only the positions are
those of the predicting states, so a decoder's batch (`causal`) must have no label in column 0.
Entity and target spans are validated here (`memory_bank.check_spans`: row, start < end <= length,
entity id >= 0).
"""
from __future__ import annotations

import torch

from trelm_fast.losses import IGNORE_INDEX, labelled_flat
from trelm_fast.memory_bank import check_spans, first_in_context_and_rank, right_padded_lengths

DERIVED = ("lengths", "tokens", "mlm_positions", "mlm_targets", "cka_positions", "cka_targets", "target_positions",
           "entity_first", "entity_rounds", "label_shift")


def prepare_batch(batch: dict, causal: bool = False) -> dict:
    """The batch (CPU tensors) with the fields of the module docstring added (a new dict); ``causal``:
    for a decoder, whose state at col - 1 predicts the token at col."""
    out = dict(batch)
    shift = int(causal)
    if causal:
        for name in ("mlm_labels", "cka_labels"):
            if bool(batch[name][:, 0].ne(IGNORE_INDEX).any()):
                raise ValueError(f"batch {name}: a decoder predicts the token at col from the state at col - 1, "
                                 "so column 0 must not be labelled")
    lengths = right_padded_lengths(batch["attention_mask"], "batch")
    spans = batch["entity_spans"]
    check_spans(spans, lengths, "batch entity_spans")
    targets = batch["target_spans"]
    check_spans(targets, lengths, "batch target_spans")
    from trelm_fast.model import span_positions

    out["lengths"], out["tokens"] = lengths, int(lengths.sum())
    out["label_shift"] = shift
    for kind in ("mlm", "cka"):
        positions, out[f"{kind}_targets"] = labelled_flat(batch[f"{kind}_labels"])
        out[f"{kind}_positions"] = positions - shift
    out["target_positions"] = torch.stack(span_positions(targets))
    out["entity_first"], rank = first_in_context_and_rank(spans[:, 3], spans[:, 0])
    out["entity_rounds"] = int(rank.max()) + 1 if rank.numel() else 0
    return out


def is_prepared(batch: dict) -> bool:
    """Whether `prepare_batch` has been applied to ``batch``."""
    return all(key in batch for key in DERIVED)
