"""Routing: fused attribution vs the Knowledge-Neurons-style reference, IG completeness, quadrature,
selection rules, statistics and the router."""
import numpy as np
import pytest
import torch
import transformers
from transformers.masking_utils import create_bidirectional_mask

from trelm_fast.losses import MLMHead, cka_correct_prob, sample_negatives
from trelm_fast.routing import (
    KnowledgeRouter,
    PathHistory,
    attribute,
    attribute_reference,
    path_jaccard,
    path_stats,
    quadrature,
    select_paths,
)

V = 41


def _model(kind="bert", layers=3, d=20, inter=37, dtype=torch.float32, seed=0, init=0.02):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=V, hidden_size=d, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=inter,
        initializer_range=init,
    )
    cfg = transformers.BertConfig(**common) if kind == "bert" else transformers.RobertaConfig(**common)
    model = (transformers.BertForMaskedLM if kind == "bert" else transformers.RobertaForMaskedLM)(cfg)
    return model.to(dtype).train()  # routing must switch dropout off itself


def _batch(d=20, B=4, n=11, dtype=torch.float32, seed=1, K=6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, n, d, generator=g, dtype=dtype)
    mask = torch.ones(B, n, dtype=torch.long)
    mask[1, 7:] = 0
    labels = torch.full((B, n), -100)
    labels[0, 2:4] = torch.tensor([5, 7])  # a two-token target
    labels[0, 8] = 11  # a second target in the same sequence
    labels[1, 4] = 9
    labels[3, 1] = 3  # sequence 2 has no target
    tgt = labels[labels != -100]
    neg = sample_negatives(tgt, torch.ones(V) / V, K, torch.Generator().manual_seed(seed))
    return hidden, mask, labels, neg


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "kind,rule,attn",
    [("bert", "riemann", "sdpa"), ("roberta", "riemann", "sdpa"), ("bert", "gauss_legendre", "eager")],
)
def test_fused_matches_reference(kind, rule, attn):
    model = _model(kind)
    model.set_attn_implementation(attn)
    hidden, mask, labels, neg = _batch()
    fused = attribute(model, hidden, mask, labels, neg, m=6, quadrature_rule=rule, max_copies=7)
    ref = attribute_reference(model, hidden, mask, labels, neg, m=6, quadrature_rule=rule)
    assert fused.layers == ref.layers == (0, 1, 2)
    assert fused.scores.shape == (3, 37) and fused.num_targets == 5 and fused.num_sequences == 3
    assert _rel(fused.scores, ref.scores) <= 1e-4
    assert fused.prob == pytest.approx(ref.prob)
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored


def test_prob_matches_hf_forward_and_chunking_is_invisible():
    model = _model()
    hidden, mask, labels, neg = _batch()
    model.eval()
    ext = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)
    out = model.bert.encoder(hidden, attention_mask=ext).last_hidden_state
    p = cka_correct_prob(out, labels, neg, MLMHead.from_model(model))
    a = attribute(model, hidden, mask, labels, neg, m=4, layers=[1], max_copies=1)
    b = attribute(model, hidden, mask, labels, neg, m=4, layers=[1], max_copies=1000)
    assert a.prob == pytest.approx(p.mean().item(), rel=1e-5)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-7)


def _p_with_scale(model, hidden, mask, labels, neg, layer, scale):
    """P = sum of p_t with v at the target positions of `layer` multiplied by `scale` (HF forward + hook)."""
    rows, cols = (labels != -100).nonzero(as_tuple=True)

    def hook(_mod, _inp, v):
        v = v.clone()
        v[rows, cols] = v[rows, cols] * scale
        return v

    handle = model.bert.encoder.layer[layer].intermediate.register_forward_hook(hook)
    try:
        ext = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)
        out = model.bert.encoder(hidden, attention_mask=ext).last_hidden_state
        return cka_correct_prob(out, labels, neg, MLMHead.from_model(model)).sum().item()
    finally:
        handle.remove()


def test_completeness_and_quadrature_agreement():
    model = _model(dtype=torch.float64, init=0.3).eval()
    hidden, mask, labels, neg = _batch(dtype=torch.float64)
    layer = 1
    delta = _p_with_scale(model, hidden, mask, labels, neg, layer, 1.0) - _p_with_scale(model, hidden, mask, labels, neg, layer, 0.0)
    assert abs(delta) > 1e-2
    err = {}
    for m in (4, 16, 64):
        total = attribute(model, hidden, mask, labels, neg, m=m, layers=[layer]).scores.double().sum().item()
        err[m] = abs(total - delta)
    assert err[64] < err[16] < err[4] and err[64] < 0.02 * abs(delta)  # Riemann error ~ 1/m
    gl = attribute(model, hidden, mask, labels, neg, m=8, quadrature_rule="gauss_legendre", layers=[layer])
    assert abs(gl.scores.double().sum().item() - delta) < 1e-3 * abs(delta)
    exact = attribute(model, hidden, mask, labels, neg, m=16, quadrature_rule="gauss_legendre", layers=[layer]).scores
    riemann = attribute(model, hidden, mask, labels, neg, m=64, layers=[layer]).scores
    assert _rel(gl.scores, exact) < 1e-3  # GL converged with 8 points
    assert _rel(riemann, exact) < 0.05  # eq. 11 converges to the same integral


def test_quadrature_rules():
    a, w = quadrature(5, "riemann")
    torch.testing.assert_close(a, torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    assert w.sum().item() == pytest.approx(1.0)
    a, w = quadrature(3, "gauss_legendre")
    assert (a > 0).all() and (a < 1).all()
    assert (w * a**5).sum().item() == pytest.approx(1 / 6)  # exact for degree <= 5
    with pytest.raises(ValueError, match="routing.quadrature"):
        quadrature(3, "simpson")
    with pytest.raises(ValueError, match="routing.m"):
        quadrature(0)


def test_sequence_sampling_and_no_targets():
    model = _model()
    hidden, mask, labels, neg = _batch()
    sub = attribute(model, hidden, mask, labels, neg, m=3, sequences=1)
    n0 = int((labels[0] != -100).sum())
    only = attribute(model, hidden[:1], mask[:1], labels[:1], neg[:n0], m=3)
    assert sub.num_sequences == 1 and sub.num_targets == n0
    torch.testing.assert_close(sub.scores, only.scores)
    empty = attribute(model, hidden, mask, torch.full_like(labels, -100), neg[:0], m=3)
    assert empty.num_targets == 0 and empty.scores.shape == (3, 37) and not empty.scores.any()
    with pytest.raises(ValueError, match="negatives must be"):
        attribute(model, hidden, mask, labels, neg[:2], m=3)
    with pytest.raises(ValueError, match="routing.layers"):
        attribute(model, hidden, mask, labels, neg, m=3, layers=[3])


def test_swapped_ffn_gives_same_scores():
    ffn = pytest.importorskip("trelm_fast.ffn")
    model = _model()
    hidden, mask, labels, neg = _batch()
    before = attribute(model, hidden, mask, labels, neg, m=3).scores
    ffn.swap_ffn(model)
    torch.testing.assert_close(attribute(model, hidden, mask, labels, neg, m=3).scores, before)


def test_attribution_computes_no_path_slice_gradients(monkeypatch):
    """With paths set, the attribution passes must not run the slice weight-gradient products."""
    ffn = pytest.importorskip("trelm_fast.ffn")
    model = ffn.swap_ffn(_model())
    for f in ffn.ffn_modules(model):
        f.set_path(torch.arange(0, 37, 4))
    calls = []
    monkeypatch.setattr(ffn, "gathered_tn_matmul", lambda *a, **k: calls.append(1))
    hidden, mask, labels, neg = _batch()
    for attr in (attribute, attribute_reference):
        attr(model, hidden, mask, labels, neg, m=3)
    assert calls == []
    assert all(f.path is not None and all(t.grad is None for t in f.slices if t is not None)
               for f in ffn.ffn_modules(model))


def test_selection_rules():
    scores = torch.tensor([[0.1, 5.0, -2.0, 0.9, 1.2, 0.0], [3.0, 0.2, 0.1, 0.5, -1.0, 0.7]])
    top = select_paths(scores, "top_fraction", fraction=0.34)  # round(2.04) = 2 per layer
    assert [p.tolist() for p in top] == [[1, 4], [0, 5]]
    thr = select_paths(scores, "threshold", threshold=0.2)  # >= 1.0 and >= 0.6
    assert [p.tolist() for p in thr] == [[1, 4], [0, 5]]
    thr = select_paths(scores, "threshold", threshold=0.1)
    assert [p.tolist() for p in thr] == [[1, 3, 4], [0, 3, 5]]
    glob = select_paths(scores, "global_budget", fraction=0.25)  # 3 of 12 pooled
    assert [p.tolist() for p in glob] == [[1, 4], [0]]
    assert select_paths(-scores.abs() - 1, "threshold")[0].numel() == 0
    assert all(p.dtype == torch.int64 for p in top + thr + glob)
    chance = [select_paths(scores, "random", fraction=0.34, step=s) for s in (7, 7, 8)]
    assert [p.tolist() for p in chance[0]] == [p.tolist() for p in chance[1]]  # seeded by the step
    assert all(p.numel() == 2 and p.unique().numel() == 2 and (p.diff() > 0).all() for p in chance[0])
    assert [p.tolist() for p in chance[0]] != [p.tolist() for p in chance[2]]
    with pytest.raises(ValueError, match="routing.rule"):
        select_paths(scores, "best")
    with pytest.raises(ValueError, match="routing.fraction"):
        select_paths(scores, fraction=0.0)


def test_stats_history_and_plot(tmp_path):
    a, b = torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4, 5])
    assert path_jaccard(a, b) == pytest.approx(2 / 5)
    assert path_jaccard(a[:0], b[:0]) == 1.0
    stats = path_stats((0, 4), [a, b], [b, b])
    assert stats["routing/neurons/layer4"] == 4 and stats["routing/jaccard/layer4"] == 1.0
    assert stats["routing/jaccard_mean"] == pytest.approx(0.7)
    hist = PathHistory((0, 4), 8)
    hist.record(0, [a, b])
    hist.record(10, [b, a])
    out = tmp_path / "paths.png"
    hist.plot(out)
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("intermediate", [8, 11])
def test_history_state_round_trip(intermediate):
    hist = PathHistory((0, 4), intermediate)
    hist.record(0, [torch.tensor([0, 7]), torch.tensor([3])])
    hist.record(50, [torch.tensor([1, intermediate - 1]), torch.tensor([], dtype=torch.long)])
    state = hist.state_dict()
    assert state["masks"].dtype == torch.uint8 and state["masks"].shape == (2, 2, (intermediate + 7) // 8)
    back = PathHistory((0, 4), intermediate)
    back.load_state_dict(state)
    assert back.steps == [0, 50] and all(np.array_equal(x, y) for x, y in zip(back.masks, hist.masks))
    empty = PathHistory((0, 4), intermediate)
    empty.load_state_dict(PathHistory((0, 4), intermediate).state_dict())
    assert empty.steps == [] and empty.masks == []
    with pytest.raises(ValueError, match="do not fit"):
        PathHistory((0, 4, 5), intermediate).load_state_dict(state)


def test_router_refresh_cycle():
    model = _model()
    hidden, mask, labels, neg = _batch()
    router = KnowledgeRouter(model, m=3, refresh=5, fraction=0.2, layers=[0, 2])
    assert router.due(3)  # no paths yet
    paths = router.refresh(0, hidden, mask, labels, neg)
    assert [p.numel() for p in paths] == [7, 7] and all((p[1:] > p[:-1]).all() for p in paths)
    assert not router.due(3) and router.due(5)
    router.refresh(5, hidden, mask, labels, neg)
    assert router.stats["routing/jaccard_mean"] == 1.0 and 0 < router.stats["routing/prob"] < 1
    assert router.history.steps == [0, 5]
    with pytest.raises(ValueError, match="routing.refresh"):
        KnowledgeRouter(model, refresh=0)


def test_router_random_rule_draws_paths_without_attribution(monkeypatch):
    import trelm_fast.routing.router as router_module

    model = _model()
    hidden, mask, labels, neg = _batch()
    monkeypatch.setattr(router_module, "attribute", lambda *a, **k: pytest.fail("the random rule attributed"))
    router = KnowledgeRouter(model, refresh=5, fraction=0.2, layers=[0, 2], rule="random")
    paths = router.refresh(0, hidden, mask, labels, neg)
    assert [p.numel() for p in paths] == [7, 7] and all((p[1:] > p[:-1]).all() for p in paths)
    assert [p.tolist() for p in paths] == [p.tolist() for p in select_paths(torch.zeros(2, 37), "random", 0.2, step=0)]
    router.refresh(5, hidden, mask, labels, neg)
    assert router.stats["routing/jaccard_mean"] < 1.0 and "routing/prob" not in router.stats


def test_router_from_config_and_autocast():
    from trelm_fast.config import RoutingConfig

    model = _model()
    hidden, mask, labels, neg = _batch()
    cfg = RoutingConfig(m=4, quadrature="gauss_legendre", layers=[1, 2], refresh=3, rule="threshold", threshold=0.2)
    router = KnowledgeRouter.from_config(model, cfg)
    assert (router.m, router.quadrature, router.layers, router.refresh_every, router.rule) == (4, "gauss_legendre", (1, 2), 3, "threshold")
    full = attribute(model, hidden, mask, labels, neg, m=4, quadrature_rule="gauss_legendre")
    low = attribute(model, hidden, mask, labels, neg, m=4, quadrature_rule="gauss_legendre", autocast=torch.bfloat16)
    assert _rel(low.scores, full.scores) < 0.05 and low.scores.dtype == torch.float32


def test_max_copies_auto_is_64_on_cpu_and_config_checked():
    from trelm_fast.config import ConfigError, load_config
    from trelm_fast.routing.fused import CPU_MAX_COPIES, auto_max_copies

    assert auto_max_copies(torch.zeros(2, 5, 8), layers_above=3) == CPU_MAX_COPIES == 64
    assert load_config(None, []).routing.max_copies == 0
    with pytest.raises(ConfigError, match="routing.max_copies"):
        load_config(None, ["routing.max_copies=-1"])


@pytest.mark.cuda
def test_max_copies_auto_on_cuda_fits_half_the_free_memory():
    from trelm_fast.routing.fused import ACTIVATIONS_PER_LAYER, auto_max_copies

    hidden = torch.zeros(4, 128, 768, device="cuda", dtype=torch.bfloat16)
    copies = auto_max_copies(hidden, layers_above=11)
    free, _ = torch.cuda.mem_get_info()
    per_copy = ACTIVATIONS_PER_LAYER * 128 * 768 * 11 * 2
    assert copies >= 1 and copies * per_copy <= 0.5 * free + per_copy


def test_max_copies_bounds_the_copies_alive_in_a_pass(monkeypatch):
    """One pass carries points of every attributed layer; max_copies bounds its sequence copies
    (split into layer groups below one point of every layer), never the result."""
    from trelm_fast.models.bert import BertAdapter
    from trelm_fast.routing.fused import passes

    assert passes((0, 1, 2, 3), m=5, sequences=3, max_copies=1000) == ([(0, 1, 2, 3)], 5)
    assert passes((0, 1, 2, 3), m=5, sequences=3, max_copies=25) == ([(0, 1, 2, 3)], 2)
    assert passes((0, 1, 2, 3), m=5, sequences=3, max_copies=7) == ([(0, 1), (2, 3)], 1)
    assert passes((0, 1, 2, 3), m=5, sequences=3, max_copies=1) == ([(0,), (1,), (2,), (3,)], 1)
    model = _model(layers=4)
    hidden, mask, labels, neg = _batch()
    widths = []
    for name in ("attention", "attention_at"):  # the layers' batch widths
        method = getattr(BertAdapter, name)
        monkeypatch.setattr(BertAdapter, name, lambda self, layer, h, *a, f=method: widths.append(h.shape[0]) or
                            f(self, layer, h, *a))
    whole = attribute(model, hidden, mask, labels, neg, m=5, max_copies=1000)
    assert max(widths) == 3 * 5 * 3  # the copies of layers 0-2 meet in layer 3 (layer 3's own skip it)
    for bound in (25, 7):
        widths.clear()
        chunked = attribute(model, hidden, mask, labels, neg, m=5, max_copies=bound)
        assert 3 < max(widths) <= bound
        torch.testing.assert_close(chunked.scores, whole.scores, rtol=1e-5, atol=1e-7)
