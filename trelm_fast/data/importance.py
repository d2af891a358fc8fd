"""Semantic importance of entity mentions (paper eq. 1), batched with the base encoder.

For a mention e in sequence x: h_o is the mean-pooled final-layer state of x (MiniLM is a
mean-pooling sentence encoder), h_rep the same for x with e's tokens set to [MASK], and

    SI(e) = |h_o| |h_rep| / (h_o . h_rep)          (= 1 / cos(h_o, h_rep))

Higher SI: replacing e changes the sentence representation more. Where cos <= MIN_COS (the
replacement turned the representation orthogonal or around, the largest change there is) SI is
1 / MIN_COS, not negative or infinite, so such mentions rank first. x is the sentence that contains
the mention (``sentence_contexts``: the sentences of a training sequence, split after '.', '!',
'?', wrapped in [CLS] ... [SEP]), as in the paper, which also keeps the encoder input short. One
encoder forward scores a whole group: the group's original sentences and every replaced variant of
all their mentions, padded to the group's longest sentence.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

MIN_COS = 1e-3
"""Floor of cos(h_o, h_rep) in SI: SI <= 1 / MIN_COS."""


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[R, L, d], [R, L] -> [R, d]: mean over real (mask = 1) positions."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def semantic_importance(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        spans: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SI for every span, in one forward.

    input_ids, attention_mask: int64 [B, L]; spans: int64 [M, 3] rows (row, start, end), token
    positions, end exclusive. Returns float32 [M].
    """
    if spans.numel() == 0:
        return torch.zeros(0)
    rows, starts, ends = spans[:, 0], spans[:, 1], spans[:, 2]
    L = input_ids.shape[1]
    pos = torch.arange(L)
    replaced = input_ids[rows].clone()
    inside = (pos >= starts[:, None]) & (pos < ends[:, None])
    replaced[inside] = mask_id
    ids = torch.cat([input_ids, replaced])
    att = torch.cat([attention_mask, attention_mask[rows]])
    h = mean_pool(encoder(input_ids=ids, attention_mask=att).last_hidden_state, att).float()
    h_o, h_rep = h[: input_ids.shape[0]][rows], h[input_ids.shape[0]:]
    norms = h_o.norm(dim=-1) * h_rep.norm(dim=-1)
    return (norms / (h_o * h_rep).sum(-1).maximum(MIN_COS * norms)).float()


def sentence_contexts(input_ids: list[int], spans: np.ndarray, break_ids: frozenset[int]
                      ) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
    """Split a ``[CLS] ... [SEP]`` sequence into the sentences that contain its mentions.

    spans: int [M, 2] (start, end) in sequence positions. Returns (context ids ``[CLS] sentence
    [SEP]``, the spans shifted into the context [k, 2], the indices of those spans in ``spans``) per
    context. A mention that crosses a sentence end (``"St. Louis"``) gets the sentences it touches.
    """
    inner = input_ids[1:-1]
    cuts = [0] + [i + 1 for i, t in enumerate(inner) if t in break_ids and i + 1 < len(inner)] + [len(inner)]
    sentence_of = np.searchsorted(np.array(cuts), np.arange(len(inner)), side="right") - 1
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (a, b) in enumerate(np.asarray(spans).reshape(-1, 2)):
        lo, hi = cuts[sentence_of[a - 1]], cuts[sentence_of[b - 2] + 1]
        groups.setdefault((lo, hi), []).append(k)
    cls, sep = input_ids[0], input_ids[-1]
    out = []
    for (lo, hi), ks in groups.items():
        idx = np.array(ks, dtype=np.int64)
        out.append(([cls] + inner[lo:hi] + [sep], np.asarray(spans)[idx] - lo, idx))
    return out


def score_sequences(encoder, sequences: list[list[int]], spans: list[np.ndarray], mask_id: int, pad_id: int,
                    max_rows: int = 96, progress: bool = True) -> tuple[list[np.ndarray], dict]:
    """SI for every span of every sequence.

    sequences: token id lists; spans[i]: int [M_i, 2] (start, end) for sequence i. A sequence
    repeated with the same spans (templated text) is scored once. Sequences are grouped by length
    so that a group's originals plus replaced variants stay within ``max_rows`` encoder rows.
    Returns per-sequence float32 [M_i] arrays and ``{"mentions", "unique_mentions", "seconds",
    "cpu_seconds", "mentions_per_s"}`` (wall clock; cpu_seconds tells a busy machine apart).
    """
    first: dict[tuple, int] = {}
    rep = [first.setdefault((tuple(q), np.asarray(sp, np.int64).tobytes()), i)
           for i, (q, sp) in enumerate(zip(sequences, spans))]
    order = sorted((i for i in range(len(sequences)) if rep[i] == i), key=lambda i: len(sequences[i]))
    out = [np.zeros(len(s), np.float32) for s in spans]
    total, unique = sum(len(s) for s in spans), sum(len(spans[i]) for i in order)
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(total=unique, desc="SI scoring", unit="mention", disable=not progress)
    group: list[int] = []
    rows = 0

    def flush():
        L = max(len(sequences[i]) for i in group)
        ids = torch.full((len(group), L), pad_id, dtype=torch.long)
        att = torch.zeros((len(group), L), dtype=torch.long)
        sp = []
        for r, i in enumerate(group):
            ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
            att[r, : len(sequences[i])] = 1
            sp += [(r, int(a), int(b)) for a, b in spans[i]]
        si = semantic_importance(encoder, ids, att, torch.tensor(sp, dtype=torch.long).reshape(-1, 3), mask_id)
        k = 0
        for i in group:
            out[i] = si[k:k + len(spans[i])].numpy()
            k += len(spans[i])
        bar.update(k)

    for i in order:
        if not len(spans[i]):
            continue
        need = 1 + len(spans[i])
        if group and rows + need > max_rows:
            flush()
            group, rows = [], 0
        group.append(i)
        rows += need
    if group:
        flush()
    bar.close()
    for i, r in enumerate(rep):
        if r != i:
            out[i] = out[r]
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, {"mentions": total, "unique_mentions": unique, "seconds": round(dt, 3), "cpu_seconds": round(cpu, 3),
                 "mentions_per_s": round(total / dt, 1) if dt else 0.0}
