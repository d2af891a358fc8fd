"""configure_trainable and TrelmOptimizer against dense autograd + torch AdamW (lazy semantics)."""
import copy
import io

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from trelm_fast.ffn import ffn_modules, swap_ffn
from trelm_fast.optim import (TRELM_TRAINABLE, TrelmOptimizer, configure_trainable, parameter_group)

D, I, V, L = 32, 37, 53, 2
HP = dict(lr=2e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.05)


def _model(seed=0, cls=BertForMaskedLM, cfg_cls=BertConfig):
    torch.manual_seed(seed)
    extra = dict(pad_token_id=1) if cfg_cls is RobertaConfig else {}
    m = cls(cfg_cls(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                    intermediate_size=I, max_position_embeddings=24, **extra))
    return m.eval()


def _ids(seed):
    return torch.randint(2, V, (3, 9), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids):
    return model(input_ids=ids).logits.pow(2).mean() + model(input_ids=ids).logits[..., 4].sum() * 0.1


def test_parameter_groups_bert_and_roberta():
    for cls, cfg in ((BertForMaskedLM, BertConfig), (RobertaForMaskedLM, RobertaConfig)):
        groups = {n: parameter_group(n) for n, _ in _model(cls=cls, cfg_cls=cfg).named_parameters()}
        pre = "bert" if cls is BertForMaskedLM else "roberta"
        lay = f"{pre}.encoder.layer.1"
        assert groups[f"{pre}.embeddings.word_embeddings.weight"] == "embeddings"
        assert groups[f"{lay}.attention.self.query.weight"] == "attention"
        assert groups[f"{lay}.attention.output.dense.bias"] == "attention"
        assert groups[f"{lay}.attention.output.LayerNorm.weight"] == "layernorm"
        assert groups[f"{lay}.output.LayerNorm.bias"] == "layernorm"
        assert groups[f"{lay}.intermediate.dense.weight"] == "ffn"
        assert groups[f"{lay}.intermediate.dense.bias"] == "ffn"
        assert groups[f"{lay}.output.dense.weight"] == "ffn"
        assert groups[f"{lay}.output.dense.bias"] == "ffn_out_bias"
        head = [n for n, g in groups.items() if g == "head"]
        assert head and all(n.startswith(("cls.", "lm_head.")) for n in head)
        assert set(groups.values()) <= {"embeddings", "attention", "layernorm", "ffn", "ffn_out_bias", "head"}
    assert parameter_group("knowledge_proj.weight") == "other"


def test_configure_trainable_groups_patterns_and_errors():
    m = swap_ffn(_model())
    names = configure_trainable(m)
    assert names and all(parameter_group(n) in TRELM_TRAINABLE for n in names)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n not in names)
    names = configure_trainable(m, {"head", "bert.encoder.layer.1.attention.*"})
    assert "bert.encoder.layer.1.attention.self.key.weight" in names
    assert "bert.encoder.layer.0.attention.self.key.weight" not in names
    with pytest.raises(ValueError, match="unknown group.*'atention'"):
        configure_trainable(m, {"atention"})


def test_frozen_params_get_no_grad_and_backward_stops_below_lowest_path():
    m = swap_ffn(_model())
    configure_trainable(m, {"head", "other"})  # the embeddings frozen too (the default trains them)
    ffns = ffn_modules(m)
    ffns[1].set_path(torch.tensor([3, 8, 20]))
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].requires_grad))
             for i, layer in enumerate(m.bert.encoder.layer)]
    _loss(m, _ids(1)).backward()
    assert seen == {0: False, 1: False}  # nothing below layer 1's FFN is in the autograd graph
    for n, p in m.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert all(t.grad is not None for t in ffns[1].slices)
    for h in hooks:
        h.remove()
    # a path in layer 0 puts layer 1's input into the graph, still no frozen weight gradient
    m.zero_grad(set_to_none=True)
    for t in ffns[1].slices:
        t.grad = None
    ffns[0].set_path(torch.tensor([0]))
    seen.clear()
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].requires_grad))
             for i, layer in enumerate(m.bert.encoder.layer)]
    _loss(m, _ids(1)).backward()
    assert seen == {0: False, 1: True}
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)
    assert ffns[0].slices.w1.grad.shape == (1, D)


class _LazyReference:
    """torch AdamW over the dense trainable params + one AdamW parameter per neuron slice (at
    ``slice_lr``, default the dense rate)."""

    def __init__(self, model, slice_lr=HP["lr"]):
        self.model = model
        self.dense = [p for n, p in model.named_parameters() if parameter_group(n) in TRELM_TRAINABLE]
        decay = [p for p in self.dense if p.dim() >= 2]
        no_decay = [p for p in self.dense if p.dim() < 2]
        kw = dict(lr=HP["lr"], betas=HP["betas"], eps=HP["eps"], foreach=False)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": HP["weight_decay"]},
                                      {"params": no_decay, "weight_decay": 0.0}], **kw)
        self.layers = model.bert.encoder.layer
        self.rows = [[(torch.nn.Parameter(layer.intermediate.dense.weight[i].detach().clone()),
                       torch.nn.Parameter(layer.intermediate.dense.bias[i:i + 1].detach().clone()),
                       torch.nn.Parameter(layer.output.dense.weight[:, i].detach().clone()))
                      for i in range(I)] for layer in self.layers]
        flat = [r for layer in self.rows for r in layer]
        self.ffn_opt = torch.optim.AdamW(
            [{"params": [p for r in flat for p in (r[0], r[2])], "weight_decay": HP["weight_decay"]},
             {"params": [r[1] for r in flat], "weight_decay": 0.0}], **{**kw, "lr": slice_lr})

    def step(self, paths):
        for layer, rows, path in zip(self.layers, self.rows, paths):
            w1, w2 = layer.intermediate.dense, layer.output.dense
            for i, (r1, rb, r2) in enumerate(rows):
                on = i in set(path.tolist())
                r1.grad = w1.weight.grad[i].clone() if on else None
                rb.grad = w1.bias.grad[i:i + 1].clone() if on else None
                r2.grad = w2.weight.grad[:, i].clone() if on else None
        self.opt.step(), self.ffn_opt.step()
        with torch.no_grad():
            for layer, rows in zip(self.layers, self.rows):
                for i, (r1, rb, r2) in enumerate(rows):
                    layer.intermediate.dense.weight[i] = r1
                    layer.intermediate.dense.bias[i] = rb[0]
                    layer.output.dense.weight[:, i] = r2
        self.model.zero_grad(set_to_none=True)


PATHS = [[torch.tensor([0, 5, 6, 36]), torch.tensor([2])],
         [torch.tensor([5, 7]), torch.tensor(list(range(I)))],
         [torch.tensor([0, 5, 30]), torch.tensor([2, 3])]]


def _train_trelm(model, opt, steps):
    for it in steps:
        for f, p in zip(ffn_modules(model), PATHS[it]):
            f.set_path(p)
        _loss(model, _ids(it)).backward()
        opt.step()
        opt.zero_grad()


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("slice_lr_scale", [1.0, 2.5])
def test_slice_optimizer_equals_lazy_torch_adamw(slice_lr_scale):
    ref = _model()
    trelm = swap_ffn(copy.deepcopy(ref))
    configure_trainable(trelm)
    configure_trainable(ref, TRELM_TRAINABLE | {"ffn"})
    opt = TrelmOptimizer(trelm, **HP, slice_lr_scale=slice_lr_scale)
    lazy = _LazyReference(ref, slice_lr=HP["lr"] * slice_lr_scale)
    for it in range(3):
        for f, p in zip(ffn_modules(trelm), PATHS[it]):
            f.set_path(p)
        _loss(trelm, _ids(it)).backward()
        _loss(ref, _ids(it)).backward()
        opt.step()
        opt.zero_grad()
        lazy.step(PATHS[it])
    changed = 0
    for (n, p), (n2, q) in zip(trelm.named_parameters(), ref.named_parameters(), strict=True):
        assert _rel(p, q) <= 1e-5, n
        changed += not torch.equal(p, _model().state_dict()[n])
    assert changed >= 3 * L + 4
    # neurons never on a path were not touched at all (no drift, no decay)
    init = _model().bert.encoder.layer[0]
    never = sorted(set(range(I)) - {0, 5, 6, 7, 30, 36})
    assert torch.equal(trelm.bert.encoder.layer[0].intermediate.dense.weight[never],
                       init.intermediate.dense.weight[never])
    assert torch.equal(opt.slice_state[0]["step"][[0, 5, 6, 7, 30, 36, 1]], torch.tensor([2, 3, 1, 1, 1, 1, 0]))


def test_state_dict_roundtrip_weights_only_and_resume():
    base = swap_ffn(_model())
    configure_trainable(base)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a = TrelmOptimizer(a, **HP)
    _train_trelm(a, opt_a, [0, 1, 2])
    opt_b = TrelmOptimizer(b, **HP)
    _train_trelm(b, opt_b, [0, 1])
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = copy.deepcopy(base)
    c.load_state_dict(ckpt["model"])
    opt_c = TrelmOptimizer(c, lr=1.0)
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.lr == HP["lr"] and opt_c.betas == HP["betas"]
    _train_trelm(c, opt_c, [2])
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), n
    with pytest.raises(ValueError, match="FFN layers"):
        TrelmOptimizer(_model(), **HP).load_state_dict(ckpt["opt"])


def test_lr_setter_zero_grad_and_bad_hyperparameters():
    m = swap_ffn(_model())
    configure_trainable(m)
    opt = TrelmOptimizer(m, **HP)
    opt.lr = 0.0
    assert all(g["lr"] == 0.0 for g in opt.dense.param_groups)
    f = ffn_modules(m)[0]
    f.set_path(torch.tensor([1, 2]))
    before = {n: p.clone() for n, p in m.named_parameters()}
    _loss(m, _ids(0)).backward()
    opt.step()
    for n, p in m.named_parameters():  # lr 0 and no decay effect: nothing moves
        assert torch.equal(p, before[n]), n
    opt.zero_grad()
    assert all(t.grad is None for t in f.slices)
    assert all(p.grad is None for p in m.parameters())
    f.set_path(torch.tensor([4]))  # allowed after zero_grad
    with pytest.raises(ValueError, match="invalid hyper-parameters"):
        TrelmOptimizer(m, lr=1e-3, betas=(0.9, 1.0))


# per refresh, one path per layer: the sizes stay (3 and 2 ids), the ids change (int32 ids in the last)
SAME_SIZE_PATHS = [[torch.tensor([0, 5, 6]), torch.tensor([2, 36])],
                   [torch.tensor([1, 5, 30]), torch.tensor([3, 9])],
                   [torch.tensor([4, 7, 8], dtype=torch.int32), torch.tensor([0, 36], dtype=torch.int32)]]


def test_a_same_size_path_is_copied_in_place_and_trains_as_fresh_leaves():
    """set_path with as many ids keeps the path buffer and the leaves (what a CUDA graph points at)
    and trains exactly as a path set on fresh leaves (cleared first: the allocating route)."""
    base = swap_ffn(_model())
    configure_trainable(base)
    kept, fresh = copy.deepcopy(base), copy.deepcopy(base)
    opt_kept, opt_fresh = TrelmOptimizer(kept, **HP), TrelmOptimizer(fresh, **HP)
    given = [[p.clone() for p in paths] for paths in SAME_SIZE_PATHS]
    tensors = None
    for it, paths in enumerate(SAME_SIZE_PATHS):
        for f, g, p in zip(ffn_modules(kept), ffn_modules(fresh), paths):
            f.set_path(p)
            g.set_path(None)
            g.set_path(p)
            assert f.path is not p and torch.equal(f.path, p.long()) and f.path.dtype == torch.int64
        now = [t for f in ffn_modules(kept) for t in (f.path, *f.leaves)]
        if tensors is not None:
            assert all(a is b for a, b in zip(now, tensors, strict=True))  # the same objects
        tensors = now
        assert all(not t.any() and t.grad is None for f in ffn_modules(kept) for t in f.leaves)
        loss_kept, loss_fresh = _loss(kept, _ids(it)), _loss(fresh, _ids(it))
        assert torch.equal(loss_kept, loss_fresh)
        loss_kept.backward(), loss_fresh.backward()
        for f, g in zip(ffn_modules(kept), ffn_modules(fresh)):
            assert all(torch.equal(a.grad, b.grad) for a, b in zip(f.leaves, g.leaves, strict=True))
        opt_kept.step(), opt_fresh.step()
        opt_kept.zero_grad(), opt_fresh.zero_grad()
    for (n, p), (_, q) in zip(kept.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    for a, b in zip(opt_kept.slice_state, opt_fresh.slice_state, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for paths, copies in zip(SAME_SIZE_PATHS, given):  # the callers' tensors were never written to
        assert all(torch.equal(p, c) for p, c in zip(paths, copies))
    f = ffn_modules(kept)[0]
    f.set_path(torch.tensor([1, 2, 3, 4]))  # another size: a new buffer and new leaves
    assert f.path is not tensors[0] and all(t is not old for t in f.leaves for old in tensors)
    assert f.leaves[0].shape == (4, D)
