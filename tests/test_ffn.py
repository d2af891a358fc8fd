"""TrelmFFN / swap_ffn: drop-in equivalence and sparse slice gradients against dense autograd."""
import copy

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForMaskedLM, BertModel, RobertaConfig, RobertaForMaskedLM,
                          RobertaModel)

from trelm_fast import TrelmFFN, swap_ffn, unswap_ffn
from trelm_fast.ffn import FFNSlices, SliceLinear, ffn_modules, suspended_paths, trelm_ffn

D, I, V, L = 32, 37, 53, 2


def _config(cls, **kw):
    base = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                intermediate_size=I, max_position_embeddings=16)
    if cls is RobertaConfig:
        base.update(pad_token_id=1, max_position_embeddings=24)
    return cls(**{**base, **kw})


MODELS = [(BertForMaskedLM, BertConfig), (RobertaForMaskedLM, RobertaConfig),
          (BertModel, BertConfig), (RobertaModel, RobertaConfig)]


def _pair(model_cls, cfg_cls, seed=0, **kw):
    torch.manual_seed(seed)
    ref = model_cls(_config(cfg_cls, **kw))
    return ref, swap_ffn(copy.deepcopy(ref))


def _loss(model, ids, seed=1, embeds=None):
    torch.manual_seed(seed)
    kw = dict(inputs_embeds=embeds) if embeds is not None else dict(input_ids=ids)
    out = model(**kw)
    if hasattr(out, "logits"):
        return out.logits.float().pow(2).mean() + out.logits[..., 3].sum()
    return out.last_hidden_state.pow(2).mean() + out.last_hidden_state[..., 5].sum()


def _ids(b=3, n=9, seed=2):
    return torch.randint(2, V, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS)
@pytest.mark.parametrize("train", [False, True])
def test_no_path_is_identical(model_cls, cfg_cls, train):
    ref, swapped = _pair(model_cls, cfg_cls)
    ref.train(train), swapped.train(train)
    ids = _ids()
    lr, ls = _loss(ref, ids), _loss(swapped, ids)
    assert torch.equal(lr, ls)
    lr.backward(), ls.backward()
    for (n, p), (n2, p2) in zip(ref.named_parameters(), swapped.named_parameters(), strict=True):
        assert n == n2 and (p.grad is None) == (p2.grad is None), n
        assert p.grad is None or torch.equal(p.grad, p2.grad), n


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS)
def test_names_state_dicts_and_attributes(model_cls, cfg_cls):
    ref, swapped = _pair(model_cls, cfg_cls)
    assert list(ref.state_dict()) == list(swapped.state_dict())
    assert [n for n, _ in ref.named_parameters(remove_duplicate=False)] == \
        [n for n, _ in swapped.named_parameters(remove_duplicate=False)]
    torch.manual_seed(5)
    other = model_cls(_config(cfg_cls))
    swapped.load_state_dict(other.state_dict())          # plain -> swapped
    other2 = model_cls(_config(cfg_cls))
    other2.load_state_dict(swapped.state_dict())          # swapped -> plain
    for (n, p), (_, q) in zip(other.named_parameters(), other2.named_parameters()):
        assert torch.equal(p, q), n
    ffns = ffn_modules(swapped)
    layers = (swapped.base_model if hasattr(swapped, "base_model") else swapped).encoder.layer
    assert [f.layer_idx for f in ffns] == list(range(L))
    for f, layer in zip(ffns, layers):
        assert layer.trelm_ffn is f and isinstance(f, TrelmFFN)
        assert isinstance(layer.intermediate.dense, nn.Linear)
        assert layer.intermediate.dense.weight.shape == (I, D) and layer.output.dense.weight.shape == (D, I)
        assert callable(layer.intermediate.intermediate_act_fn)
        assert isinstance(layer.output.LayerNorm, nn.LayerNorm) and isinstance(layer.output.dropout, nn.Dropout)
        assert f.up is layer.intermediate.dense and f.down is layer.output.dense


def test_swap_is_idempotent_and_unswap_restores():
    ref, swapped = _pair(BertForMaskedLM, BertConfig)
    w = swapped.bert.encoder.layer[0].intermediate.dense.weight
    swap_ffn(swapped)
    assert swapped.bert.encoder.layer[0].intermediate.dense.weight is w
    ffn_modules(swapped)[0].set_path(torch.tensor([1, 4]))
    unswap_ffn(swapped)
    assert ffn_modules(swapped) == []
    for layer in swapped.bert.encoder.layer:
        assert type(layer.intermediate.dense) is nn.Linear and type(layer.output.dense) is nn.Linear
        assert not hasattr(layer, "trelm_ffn")
    assert swapped.bert.encoder.layer[0].intermediate.dense.weight is w
    ref.eval(), swapped.eval()
    assert torch.equal(_loss(ref, _ids()), _loss(swapped, _ids()))


def test_unsupported_model_names_the_module():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2, enable_nested_tensor=False)
    with pytest.raises(TypeError, match="TransformerEncoder.*TransformerEncoderLayer"):
        swap_ffn(enc)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS[:2])
@pytest.mark.parametrize("k", [1, 5, 18, I])
def test_slice_grads_match_dense(model_cls, cfg_cls, k):
    ref, swapped = _pair(model_cls, cfg_cls, seed=k)
    ref.train(), swapped.train()
    g = torch.Generator().manual_seed(k)
    paths = [torch.randperm(I, generator=g)[:k].sort().values for _ in range(L)]
    for f, p in zip(ffn_modules(swapped), paths):
        f.set_path(p)
    emb = torch.randn(3, 9, D, generator=g)
    e_ref, e_sw = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    lr, ls = _loss(ref, None, embeds=e_ref), _loss(swapped, None, embeds=e_sw)
    assert torch.equal(lr, ls)
    lr.backward(), ls.backward()
    assert _rel(e_sw.grad, e_ref.grad) <= 1e-5
    for f, layer_ref, p in zip(ffn_modules(swapped), ref.base_model.encoder.layer, paths):
        s = f.slices
        w1, w2 = layer_ref.intermediate.dense, layer_ref.output.dense
        assert s.w1.grad.shape == (k, D) and s.b1.grad.shape == (k,) and s.w2.grad.shape == (D, k)
        assert _rel(s.w1.grad, w1.weight.grad[p]) <= 1e-5
        assert _rel(s.b1.grad, w1.bias.grad[p]) <= 1e-5
        assert _rel(s.w2.grad, w2.weight.grad[:, p]) <= 1e-5
        # no full-size FFN weight gradient exists for a layer with a path
        assert f.up.weight.grad is None and f.up.bias.grad is None and f.down.weight.grad is None
        # b2 keeps training densely (its own requires_grad) and matches
        assert _rel(f.down.bias.grad, w2.bias.grad) <= 1e-5
    # every other parameter still gets its exact dense gradient
    ref_grads = dict(ref.named_parameters())
    for n, prm in swapped.named_parameters():
        if prm.grad is not None:
            assert _rel(prm.grad, ref_grads[n].grad) <= 1e-5, n


def test_grad_accumulates_over_micro_batches_and_chunking():
    ref, swapped = _pair(BertForMaskedLM, BertConfig, chunk_size_feed_forward=3)
    ref.eval(), swapped.eval()
    p = torch.tensor([0, 2, 7, 11, 36])
    f = ffn_modules(swapped)[1]
    f.set_path(p)
    for seed in (3, 4):
        _loss(ref, _ids(seed=seed)).backward()
        _loss(swapped, _ids(seed=seed)).backward()
    w = ref.bert.encoder.layer[1]
    assert _rel(f.slices.w1.grad, w.intermediate.dense.weight.grad[p]) <= 1e-5
    assert _rel(f.slices.w2.grad, w.output.dense.weight.grad[:, p]) <= 1e-5


def test_set_path_validation():
    _, swapped = _pair(BertForMaskedLM, BertConfig)
    f = ffn_modules(swapped)[0]
    for bad, msg in [(torch.tensor([3, 1]), "sorted and unique"), (torch.tensor([1, 1]), "sorted and unique"),
                     (torch.tensor([0, I]), r"\[0, 37\)"), (torch.tensor([-1, 2]), r"\[0, 37\)"),
                     (torch.tensor([1.0]), "1-D integer"), (torch.tensor([[1]]), "1-D integer"),
                     ([1, 2], "1-D integer")]:
        with pytest.raises(ValueError, match=f"layer 0.*{msg}"):
            f.set_path(bad)
    f.set_path(torch.tensor([4, 9], dtype=torch.int32))
    assert f.path.dtype == torch.int64 and f.path.tolist() == [4, 9]
    _loss(swapped, _ids()).backward()
    with pytest.raises(RuntimeError, match="still holds slice gradients"):
        f.set_path(torch.tensor([1]))
    for t in f.slices:
        t.grad = None
    f.set_path(None)
    assert f.path is None and f.slices is None


@pytest.mark.parametrize("act", [torch.nn.functional.gelu, torch.relu, torch.tanh])
def test_functional_ffn_matches_autograd(act):
    g = torch.Generator().manual_seed(7)
    d, n_i, t = 19, 45, 13
    x = torch.randn(t, d, generator=g)
    w1, b1 = torch.randn(n_i, d, generator=g), torch.randn(n_i, generator=g)
    w2, b2 = torch.randn(d, n_i, generator=g), torch.randn(d, generator=g)
    dy = torch.randn(t, d, generator=g)
    dense = [z.clone().requires_grad_() for z in (x, w1, b1, w2)]
    (trelm_ffn(*dense[:3], dense[3], b2, act) * dy).sum().backward()
    path = torch.tensor([0, 6, 17, 44])
    sl = FFNSlices(torch.zeros(4, d, requires_grad=True), torch.zeros(4, requires_grad=True),
                   torch.zeros(d, 4, requires_grad=True))
    xs = x.clone().requires_grad_()
    y = trelm_ffn(xs, w1, b1, w2, b2, act, path, sl)
    assert torch.equal(y, trelm_ffn(x, w1, b1, w2, b2, act))
    (y * dy).sum().backward()
    assert _rel(xs.grad, dense[0].grad) <= 1e-5
    assert _rel(sl.w1.grad, dense[1].grad[path]) <= 1e-5
    assert _rel(sl.b1.grad, dense[2].grad[path]) <= 1e-5
    assert _rel(sl.w2.grad, dense[3].grad[:, path]) <= 1e-5


def test_slice_linear_bad_axis():
    with pytest.raises(ValueError, match="axis"):
        SliceLinear(3, 4, axis=2)


def test_bf16_autocast_keeps_fp32_slice_grads():
    _, swapped = _pair(BertForMaskedLM, BertConfig)
    f = ffn_modules(swapped)[0]
    f.set_path(torch.tensor([2, 3, 30]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(swapped, _ids())
    loss.backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in f.slices)


def test_suspended_paths_and_deepcopy():
    _, swapped = _pair(BertForMaskedLM, BertConfig)
    swapped.eval()
    for p in swapped.parameters():
        p.requires_grad_(False)
    f = ffn_modules(swapped)[1]
    f.set_path(torch.tensor([1, 2, 3]))
    emb = torch.randn(2, 5, D, requires_grad=True)
    with suspended_paths(swapped):
        assert f.path is None
        (g,) = torch.autograd.grad(_loss(swapped, None, embeds=emb), emb)
    assert f.path.tolist() == [1, 2, 3] and all(t.grad is None for t in f.slices)
    _loss(swapped, None, embeds=emb).backward()
    assert torch.equal(emb.grad, g)  # the exact input gradient either way
    clone = copy.deepcopy(swapped)
    for c, layer in zip(ffn_modules(clone), clone.bert.encoder.layer):
        assert c.up is layer.intermediate.dense and c.down is layer.output.dense
        assert c.up is not f.up
