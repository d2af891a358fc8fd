"""Character spans -> token spans (via a fast tokenizer's offset mapping) and packing into sequences.

A mention [s, e) (characters, end exclusive; surrounding whitespace ignored) aligns to the tokens
[i, j) that overlap it when token i starts exactly at s and token j-1 ends exactly at e. A boundary
that falls inside a token (``"Paris"`` inside ``"Parisian"`` for a tokenizer that does not split
there), or a span with no tokens, cannot be aligned; it is returned as :class:`Unaligned`, never
dropped silently. Overlapping and nested mentions are kept as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import Document


@dataclass(frozen=True)
class TokenSpan:
    """Mention ``mention`` of its document covers tokens [start, end) (end exclusive)."""

    start: int
    end: int
    mention: int


@dataclass(frozen=True)
class Unaligned:
    mention: int
    reason: str


@dataclass
class AlignedDocument:
    """A document's token ids (no special tokens) and its aligned mention spans."""

    input_ids: list[int]
    spans: list[TokenSpan]
    unaligned: list[Unaligned]


@dataclass
class Sequence:
    """One training sequence: ``[CLS] ids [SEP]`` with spans in sequence positions (CLS is 0)."""

    doc: int
    input_ids: list[int]
    spans: list[TokenSpan]


def align_offsets(text: str, offsets: np.ndarray, mentions) -> tuple[list[TokenSpan], list[Unaligned]]:
    """Align ``mentions`` (objects with start/end) to tokens given ``offsets`` [T, 2] (char start, end)."""
    starts = offsets[:, 0] if len(offsets) else np.zeros(0, np.int64)
    ends = offsets[:, 1] if len(offsets) else np.zeros(0, np.int64)
    spans, bad = [], []
    for k, m in enumerate(mentions):
        s, e = m.start, m.end
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        i = int(np.searchsorted(ends, s, side="right"))  # first token ending after s
        j = int(np.searchsorted(starts, e, side="left"))  # first token starting at/after e
        if s >= e or i >= j:
            bad.append(Unaligned(k, f"span [{m.start}, {m.end}) {text[m.start:m.end]!r} covers no token"))
        elif starts[i] != s:
            bad.append(Unaligned(k, f"span start {m.start} falls inside the token "
                                    f"{text[starts[i]:ends[i]]!r} at [{starts[i]}, {ends[i]})"))
        elif ends[j - 1] != e:
            bad.append(Unaligned(k, f"span end {m.end} falls inside the token "
                                    f"{text[starts[j - 1]:ends[j - 1]]!r} at [{starts[j - 1]}, {ends[j - 1]})"))
        else:
            spans.append(TokenSpan(i, j, k))
    return spans, bad


def align_documents(docs: list[Document], tokenizer, batch_size: int = 256) -> list[AlignedDocument]:
    """Tokenize ``docs`` (batched, no special tokens) and align every mention."""
    from transformers.utils import logging

    out, verbosity = [], logging.get_verbosity()
    logging.set_verbosity_error()  # documents longer than the model's max length are expected: they get packed
    try:
        encs = [tokenizer([d.text for d in docs[b:b + batch_size]], add_special_tokens=False,
                          return_offsets_mapping=True) for b in range(0, len(docs), batch_size)]
    finally:
        logging.set_verbosity(verbosity)
    for b, enc in zip(range(0, len(docs), batch_size), encs):
        chunk = docs[b:b + batch_size]
        for d, ids, offs in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            spans, bad = align_offsets(d.text, np.asarray(offs, dtype=np.int64).reshape(-1, 2), d.entities)
            out.append(AlignedDocument(list(ids), spans, bad))
    return out


def pack_document(doc_index: int, aligned: AlignedDocument, seq_len: int, cls_id: int, sep_id: int,
                  break_ids: frozenset[int]) -> tuple[list[Sequence], list[TokenSpan]]:
    """Split a document into ``[CLS] ... [SEP]`` sequences of at most ``seq_len`` tokens.

    Cuts fall after a sentence-ending token (``break_ids``) where possible, otherwise at the
    latest position that splits no mention. Returns the sequences and the spans that could not be
    kept (a mention longer than ``seq_len - 2`` tokens).
    """
    cap = seq_len - 2
    if cap < 1:
        raise ValueError(f"seq_len must be at least 3, got {seq_len}")
    ids, n = aligned.input_ids, len(aligned.input_ids)
    spans = sorted(aligned.spans, key=lambda s: (s.start, s.end))
    inside = np.zeros(n + 1, dtype=bool)  # inside[c]: cutting before token c splits a mention
    for s in spans:
        inside[s.start + 1:s.end] = True
    seqs, dropped, a = [], [], 0
    while a < n:
        b = min(a + cap, n)
        if b < n:
            ok = [c for c in range(b, a, -1) if not inside[c]]
            sentence = [c for c in ok if ids[c - 1] in break_ids]
            b = sentence[0] if sentence else (ok[0] if ok else b)
        kept = [TokenSpan(s.start - a + 1, s.end - a + 1, s.mention) for s in spans if a <= s.start and s.end <= b]
        dropped += [s for s in spans if s.start < b < s.end]
        seqs.append(Sequence(doc_index, [cls_id] + ids[a:b] + [sep_id], kept))
        a = b
    return seqs, dropped
