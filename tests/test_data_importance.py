"""SI (paper eq. 1): the batched scorer against a direct one-mention-at-a-time computation."""
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from trelm_fast.data.base_model import load_encoder, load_tokenizer
from trelm_fast.data.importance import MIN_COS, score_sequences, semantic_importance, sentence_contexts

MASK = 4


def direct_si(encoder, ids: list[int], start: int, end: int, mask_id: int) -> float:
    """SI of one mention, unbatched and unpadded: 1 / cos(mean h(x), mean h(x with [MASK] over the span))."""
    with torch.no_grad():
        x = torch.tensor([ids])
        rep = x.clone()
        rep[0, start:end] = mask_id
        h_o = encoder(input_ids=x).last_hidden_state[0].mean(0).double()
        h_r = encoder(input_ids=rep).last_hidden_state[0].mean(0).double()
    return float(h_o.norm() * h_r.norm() / (h_o @ h_r))


@pytest.fixture(scope="module")
def small_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=53, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=37, max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_batched_matches_direct_random(small_bert):
    rng = np.random.default_rng(1)
    seqs, spans = [], []
    for _ in range(9):
        n = int(rng.integers(3, 29))
        seqs.append([int(t) for t in rng.integers(5, 53, n)])
        k = int(rng.integers(0, 4))
        st = rng.integers(1, n - 1, k)
        spans.append(np.array([(s, min(n - 1, s + int(rng.integers(1, 4)))) for s in st], dtype=np.int64).reshape(-1, 2))
    seqs, spans = seqs + seqs[:4], spans + spans[:4]  # repeated sequences are scored once
    # small max_rows forces several groups, mixed lengths and padding
    got, stats = score_sequences(small_bert, seqs, spans, MASK, pad_id=0, max_rows=7, progress=False)
    assert stats["mentions"] == sum(len(s) for s in spans)
    assert stats["unique_mentions"] == stats["mentions"] - sum(len(s) for s in spans[:4])
    for ids, sp, si in zip(seqs, spans, got):
        want = [direct_si(small_bert, ids, int(a), int(b), MASK) for a, b in sp]
        np.testing.assert_allclose(si, want, rtol=1e-4, atol=1e-5)


def test_si_properties(small_bert):
    ids = torch.tensor([[1, 7, 8, 9, 10, 2, 0, 0]])
    att = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    spans = torch.tensor([[0, 1, 3], [0, 1, 3], [0, 3, 4]])
    si = semantic_importance(small_bert, ids, att, spans, MASK)
    assert si.shape == (3,) and si.dtype == torch.float32
    assert si[0] == si[1] and (si >= 1 - 1e-6).all()  # SI = 1/cos >= 1 where cos > 0
    assert semantic_importance(small_bert, ids, att, torch.zeros(0, 3, dtype=torch.long), MASK).numel() == 0


class _LookupEncoder(torch.nn.Module):
    """Stub encoder: the hidden state of a token is a fixed row of `table` (no context)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"last_hidden_state": self.table[input_ids]})()


def test_si_caps_non_positive_cosine():
    """A replacement that turns the mean state orthogonal (cos = 0) or around (cos < 0) gets the
    capped, largest SI, not an infinite or negative one; cos > 0 keeps SI = 1 / cos."""
    table = torch.zeros(12, 2)
    table[7], table[11], table[MASK] = torch.tensor([1.0, 0.0]), torch.tensor([10.0, 0.0]), torch.tensor([-3.0, 1.0])
    ids = torch.tensor([[7, 7, 7, 7], [11, 11, 11, 7]])
    att = torch.ones(2, 4, dtype=torch.long)
    spans = torch.tensor([[0, 0, 1], [0, 0, 3], [1, 0, 1]])  # cos 0, cos < 0, cos = 18 / sqrt(325)
    si = semantic_importance(_LookupEncoder(table), ids, att, spans, MASK)
    assert torch.isfinite(si).all()
    assert si[:2].tolist() == pytest.approx([1 / MIN_COS] * 2)
    assert si[2] == pytest.approx(325**0.5 / 18)


def test_minilm_matches_direct():
    tok, enc = load_tokenizer(), load_encoder()
    texts = ["Zorvan Keltish was born in Paris.", "The violin player moved to Tokyo last year with her family."]
    seqs = [tok(t)["input_ids"] for t in texts]
    spans = [np.array([[1, 5], [7, 8]]), np.array([[2, 3], [6, 7]])]
    got, _ = score_sequences(enc, seqs, spans, tok.mask_token_id, tok.pad_token_id, progress=False)
    for ids, sp, si in zip(seqs, spans, got):
        np.testing.assert_allclose(si, [direct_si(enc, ids, a, b, tok.mask_token_id) for a, b in sp], rtol=1e-4)
        assert (si > 1.0).all()


def test_sentence_contexts():
    # [CLS] a b . c d e . f [SEP] with '.' = 9; mentions: (1,3) in sentence 1, (5,6) in 2, (3,6) crosses, (8,9) in 3
    ids = [1, 10, 11, 9, 12, 13, 14, 9, 15, 2]
    spans = np.array([[1, 3], [5, 6], [3, 6], [8, 9], [4, 5]])
    ctx = sentence_contexts(ids, spans, frozenset({9}))
    got = {tuple(c): (sp.tolist(), idx.tolist()) for c, sp, idx in ctx}
    assert got == {
        (1, 10, 11, 9, 2): ([[1, 3]], [0]),
        (1, 12, 13, 14, 9, 2): ([[2, 3], [1, 2]], [1, 4]),
        (1, 10, 11, 9, 12, 13, 14, 9, 2): ([[3, 6]], [2]),
        (1, 15, 2): ([[1, 2]], [3]),
    }
    for c, sp, idx in ctx:  # every context span covers the same tokens as in the sequence
        for (a, b), k in zip(sp, idx):
            assert c[a:b] == ids[spans[k, 0]:spans[k, 1]]
    whole = sentence_contexts(ids, spans[:1], frozenset())
    assert [c for c, _, _ in whole] == [ids]
