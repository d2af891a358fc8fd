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
| `mlm_count`, `cka_count` | int | N_mlm, N_cka: the real labelled positions (with static shapes, fewer than the rows) |

Static shapes (`train.static_shapes`, `pad_static`): every field above whose length depends on the
batch's content (N_mlm, N_cka, P, E, and T of `target_spans`/`target_triples`, and the step's
`cka_negatives` [N_cka, K]) is padded up to `bucket` of its length, the next power of two, with
rows that change nothing:

| field | padding rows |
|---|---|
| `mlm_positions`, `mlm_targets`, `cka_positions`, `cka_targets` | 0, with `mlm_weight` / `cka_weight` float32 [rows]: 1 / N_real for the real rows, 0 for padding (the losses sum(w * loss) are means over the real rows) |
| `cka_negatives` | 0 |
| `target_spans`, `target_triples` | 0 (the empty span (0, 0, 0, 0), the triple (0, 0)) |
| `target_positions` | (0, B, 0): row B, one past the batch, a scratch row the injection writes and drops; and `target_flat` [P] = row * n + col (B * n for padding) |
| `entity_spans`, `entity_first` | the empty span (0, 0, 0, 0), False: the bank folds in nothing (`KnowledgeMemoryBank.apply`) |

and `static_shapes` (True) marks the batch. Powers of two keep the distinct shapes few (a count
that varies by +-x% around its mean falls into one or two buckets; each is a CUDA graph to
capture) and the waste bounded: fewer than 2x the real rows, half that on average; the rows are
cheap ones (the head at labelled rows, the span gathers), not the encoder's [B, n] work.
`entity_rounds` keeps the real spans' value (padding comes after every real span, so no real
rank changes).

Labels stay in token coordinates (the label at col is the token at col); only the positions are
those of the predicting states, so a decoder's batch (`causal`) must have no label in column 0.
Entity and target spans are validated here (`memory_bank.check_spans`: row, start < end <= length,
entity id >= 0).
"""
from __future__ import annotations

import torch

from trelm_fast.kernels._launch import bucket
from trelm_fast.losses import IGNORE_INDEX, labelled_flat
from trelm_fast.memory_bank import check_spans, first_in_context_and_rank, right_padded_lengths

DERIVED = ("lengths", "tokens", "mlm_positions", "mlm_targets", "cka_positions", "cka_targets", "target_positions",
           "entity_first", "entity_rounds", "label_shift", "mlm_count", "cka_count")


def prepare_batch(batch: dict, causal: bool = False, static: bool = False) -> dict:
    """The batch (CPU tensors) with the fields of the module docstring added (a new dict); ``causal``:
    for a decoder, whose state at col - 1 predicts the token at col; ``static``: then `pad_static`."""
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
    out["mlm_count"], out["cka_count"] = out["mlm_targets"].numel(), out["cka_targets"].numel()
    return pad_static(out) if static else out


def pad_rows(t: torch.Tensor, rows: int, fill=0) -> torch.Tensor:
    """``t`` [N, ...] with rows of ``fill`` appended up to ``rows`` (N <= rows); dim 0 is the row."""
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), fill)])


def pad_static(batch: dict) -> dict:
    """A prepared batch with its content-dependent fields padded to `bucket` of their lengths (the
    table in the module docstring; a new dict). ``cka_negatives`` is padded when present; a batch
    already padded is returned as it is."""
    if batch.get("static_shapes"):
        return batch
    out = dict(batch, static_shapes=True)
    for kind in ("mlm", "cka"):
        real = batch[f"{kind}_count"]
        rows = bucket(real)
        out[f"{kind}_weight"] = pad_rows(torch.full((real,), 1.0 / max(real, 1)), rows)
        for name in (f"{kind}_positions", f"{kind}_targets") + (("cka_negatives",) if kind == "cka" else ()):
            if name in batch:
                out[name] = pad_rows(batch[name], rows)
    targets = bucket(batch["target_spans"].shape[0])
    out["target_spans"], out["target_triples"] = (pad_rows(batch[k], targets) for k in ("target_spans", "target_triples"))
    b, n = batch["input_ids"].shape
    positions = batch["target_positions"]
    scratch = torch.tensor([[0], [b], [0]]).expand(3, bucket(positions.shape[1]) - positions.shape[1])  # span 0, row B
    out["target_positions"] = padded = torch.cat([positions, scratch], 1)
    out["target_flat"] = padded[1] * n + padded[2]
    spans = bucket(batch["entity_spans"].shape[0])
    out["entity_spans"], out["entity_first"] = pad_rows(batch["entity_spans"], spans), pad_rows(batch["entity_first"], spans)
    return out


def is_prepared(batch: dict) -> bool:
    """Whether `prepare_batch` has been applied to ``batch``."""
    return all(key in batch for key in DERIVED)
