"""Losses against direct computations: full-vocabulary logits, then gather."""
import pytest
import torch
import torch.nn.functional as F
import transformers

from trelm_fast.losses import (
    MLMHead,
    NegativeSampler,
    cka_correct_prob,
    cka_loss,
    mlm_loss,
    negative_distribution,
    sample_negatives,
    trelm_loss,
)

V, D = 37, 12


def _model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    if kind == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(**common))
    return transformers.RobertaForMaskedLM(transformers.RobertaConfig(**common))


def _labels(B=3, n=7, frac=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, V, (B, n), generator=g)
    keep = torch.rand(B, n, generator=g) < frac
    return lab.masked_fill(~keep, -100)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_head_matches_hf_logits(kind):
    model = _model(kind).eval()
    head = MLMHead.from_model(model)
    h = torch.randn(2, 5, D)
    full = model.cls(h) if kind == "bert" else model.lm_head(h)
    torch.testing.assert_close(head.logits(h), full)
    assert head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_mlm_loss_matches_full_logits(kind):
    model = _model(kind)
    head = MLMHead.from_model(model)
    h = torch.randn(3, 7, D, requires_grad=True)
    labels = _labels()
    loss = mlm_loss(h, labels, head)
    full = model.cls(h) if kind == "bert" else model.lm_head(h)
    ref = F.cross_entropy(full.view(-1, V), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    (g,) = torch.autograd.grad(loss, h)
    (g_ref,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(g, g_ref)


def test_cka_matches_gathered_full_logits():
    model = _model("bert")
    head = MLMHead.from_model(model)
    h = torch.randn(3, 7, D, requires_grad=True)
    labels = _labels(seed=3)
    rows, cols = labels.ne(-100).nonzero(as_tuple=True)
    tgt = labels[rows, cols]
    q = torch.rand(V)
    neg = sample_negatives(tgt, q / q.sum(), 5, torch.Generator().manual_seed(0))
    assert neg.shape == (tgt.numel(), 5) and not neg.eq(tgt[:, None]).any()
    full = model.cls(h)[rows, cols]  # [N, V]
    sel = torch.gather(full, 1, torch.cat([tgt[:, None], neg], 1))
    ref_prob = torch.softmax(sel, -1)[:, 0]
    torch.testing.assert_close(cka_correct_prob(h, labels, neg, head), ref_prob)
    ref_loss = -torch.log(ref_prob).mean()
    loss = cka_loss(h, labels, neg, head)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(torch.autograd.grad(loss, h)[0], torch.autograd.grad(ref_loss, h)[0])


def test_collisions_are_masked_and_total_is_eq3():
    model = _model("roberta")
    head = MLMHead.from_model(model)
    h = torch.randn(2, 4, D)
    labels = torch.full((2, 4), -100)
    labels[0, 1], labels[1, 3] = 5, 9
    neg = torch.tensor([[5, 6, 5], [1, 9, 2]])  # collisions at (0,0), (0,2), (1,1)
    full = model.lm_head(h)[[0, 1], [1, 3]]
    ref0 = torch.softmax(full[0, [5, 6]], 0)[0]
    ref1 = torch.softmax(full[1, [9, 1, 2]], 0)[0]
    p = cka_correct_prob(h, labels, neg, head)
    torch.testing.assert_close(p, torch.stack([ref0, ref1]))
    mlm_labels = torch.full((2, 4), -100)
    mlm_labels[0, 0] = 3
    out = trelm_loss(h, mlm_labels, labels, neg, head, theta=0.3)
    torch.testing.assert_close(out.total, 0.3 * out.mlm + 0.7 * out.cka)
    torch.testing.assert_close(out.cka, -torch.log(p).mean())


def test_negative_sampling_follows_q_and_resamples():
    ids = torch.tensor([[2, 2, 2, 3], [3, 7, -1, -1]])
    q = negative_distribution(ids, V)
    assert q[2] == pytest.approx(0.5) and q[3] == pytest.approx(1 / 3) and q[7] == pytest.approx(1 / 6)
    tgt = torch.full((4000,), 2)
    neg = sample_negatives(tgt, q, 3, torch.Generator().manual_seed(0))
    assert neg.eq(2).sum() <= 2  # true token (Q = 0.5) resampled away, up to 16 rounds
    frac3 = neg.eq(3).float().mean().item()
    assert abs(frac3 - (1 / 3) / (1 / 2)) < 0.03  # Q conditioned on != target
    only = torch.zeros(V)
    only[4] = 1.0
    stuck = sample_negatives(torch.tensor([4]), only, 2)
    assert stuck.eq(4).all()  # cannot resample away: left for masking


def test_negative_sampler_draws_q_exactly_and_reuses_its_cdf():
    q = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 4.0, 0.0])  # zero mass first, between and last
    sampler = NegativeSampler(q)
    draws = sampler.draw(80_000, torch.Generator().manual_seed(0))
    assert draws.dtype == torch.int64
    freq = torch.bincount(draws, minlength=8).double() / draws.numel()
    assert freq[[0, 2, 4, 5, 7]].eq(0).all()  # never a token without mass
    torch.testing.assert_close(freq, q.double() / q.sum(), atol=0.01, rtol=0)
    a = sampler(torch.tensor([3, 6]), 4, torch.Generator().manual_seed(1))
    b = sample_negatives(torch.tensor([3, 6]), q, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # the one-off function is the same draw
    with pytest.raises(ValueError, match="num_negatives"):
        sampler(torch.tensor([1]), 0)


def test_empty_and_bad_inputs():
    model = _model("bert")
    head = MLMHead.from_model(model)
    h = torch.randn(2, 3, D, requires_grad=True)
    none = torch.full((2, 3), -100)
    assert mlm_loss(h, none, head).item() == 0.0
    assert cka_loss(h, none, torch.zeros(0, 4, dtype=torch.long), head).item() == 0.0
    with pytest.raises(ValueError, match="theta"):
        trelm_loss(h, none, none, torch.zeros(0, 4, dtype=torch.long), head, theta=1.5)
    with pytest.raises(ValueError, match="hidden must be"):
        mlm_loss(h, torch.full((2, 4), -100), head)
    with pytest.raises(TypeError, match="BertModel"):
        MLMHead.from_model(model.bert)
    with pytest.raises(ValueError, match="vocab_size"):
        negative_distribution(torch.tensor([V]), V)
