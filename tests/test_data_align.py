"""Span alignment (char -> token via offset mappings) and packing into sequences."""
import numpy as np
import pytest

from trelm_fast.data.align import AlignedDocument, TokenSpan, align_documents, align_offsets, pack_document
from trelm_fast.data.base_model import load_tokenizer
from trelm_fast.data.formats import Document, Mention


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _tokens(tok, text, span):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return tok.decode(ids[span.start:span.end])


def test_multi_token_and_overlapping(tok):
    text = "Zorvan Keltish met the New York Times editor in New York ."
    nyt, ny2 = text.index("New York Times"), text.rindex("New York")
    ms = [Mention(0, 14, "p"),                  # multi-token invented name
          Mention(nyt, nyt + 14, "nyt"),        # "New York Times"
          Mention(nyt, nyt + 8, "ny"),          # nested in the previous one
          Mention(ny2, ny2 + 8, "ny"),
          Mention(ny2 - 1, ny2 + 9, "ny")]      # surrounding whitespace is ignored: " New York "
    (a,) = align_documents([Document(text, ms)], tok)
    assert a.unaligned == []
    got = {s.mention: _tokens(tok, text, s) for s in a.spans}
    assert got == {0: "zorvan keltish", 1: "new york times", 2: "new york", 3: "new york", 4: "new york"}
    assert a.spans[0].end - a.spans[0].start > 2


def test_unalignable_reported(tok):
    text = "Londoners love London."
    at = text.rindex("London")
    ms = [Mention(0, 3, "lon"),               # "Lon" ends inside the token "london"
          Mention(at + 1, at + 6, "x"),       # "ondon" starts inside the token
          Mention(9, 10, "ws"),               # a single space: no token
          Mention(at, at + 6, "london")]
    (a,) = align_documents([Document(text, ms)], tok)
    assert [s.mention for s in a.spans] == [3]
    reasons = {u.mention: u.reason for u in a.unaligned}
    assert set(reasons) == {0, 1, 2}
    assert "end 3 falls inside the token" in reasons[0] and f"start {at + 1} falls inside the token" in reasons[1]
    assert "covers no token" in reasons[2]


def test_align_offsets_random_against_bruteforce():
    """Random tokenizations: a span aligns iff both ends are token boundaries."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_tok = int(rng.integers(1, 12))
        lens, gaps = rng.integers(1, 5, n_tok), rng.integers(0, 2, n_tok)
        starts = np.cumsum(np.r_[0, (lens + gaps)[:-1]]) + gaps[0]
        offs = np.stack([starts, starts + lens], 1)
        text = "".join("x" if any(s <= i < e for s, e in offs) else " " for i in range(int(offs[-1, 1]) + 1))
        ms = []
        for _ in range(6):
            s = int(rng.integers(0, len(text)))
            ms.append(Mention(s, int(rng.integers(s + 1, len(text) + 1)), "e"))
        spans, bad = align_offsets(text, offs, ms)
        assert len(spans) + len(bad) == len(ms)
        for sp in spans:
            m = ms[sp.mention]
            core = text[m.start:m.end].strip()
            assert core and offs[sp.start, 0] == m.start + (len(text[m.start:m.end]) - len(text[m.start:m.end].lstrip()))
            assert text[offs[sp.start, 0]:offs[sp.end - 1, 1]] == core


def test_pack_never_splits_mentions_and_prefers_sentence_ends():
    ids = [5, 6, 7, 99, 8, 9, 10, 11, 99, 12, 13]  # 99 is a sentence end
    a = AlignedDocument(ids, [TokenSpan(4, 7, 0), TokenSpan(5, 6, 1), TokenSpan(9, 11, 2)], [])
    seqs, dropped = pack_document(0, a, seq_len=2 + 6, cls_id=1, sep_id=2, break_ids=frozenset({99}))
    assert dropped == []
    # the cut before 12 would split mention 2 (tokens 12, 13): the sentence end before it is used
    assert [s.input_ids for s in seqs] == [[1, 5, 6, 7, 99, 2], [1, 8, 9, 10, 11, 99, 2], [1, 12, 13, 2]]
    assert seqs[1].spans == [TokenSpan(1, 4, 0), TokenSpan(2, 3, 1)]  # shifted by the cut and [CLS]
    assert seqs[2].spans == [TokenSpan(1, 3, 2)]
    seqs, dropped = pack_document(0, a, seq_len=2 + 2, cls_id=1, sep_id=2, break_ids=frozenset())
    assert {s.mention for s in dropped} == {0}  # a 3-token mention cannot fit 2 tokens; 1 and 2 fit
    assert all(len(s.input_ids) <= 4 for s in seqs) and sum(len(s.input_ids) - 2 for s in seqs) == len(ids)
