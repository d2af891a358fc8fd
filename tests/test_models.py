"""Model families through their adapters (trelm_fast.models), on tiny random configs built from each
family's *Config class: the layer split reproduces the HF forward, swap/unswap is bit-identical with
no path, slice gradients equal the dense gradients restricted to the path, fused attribution equals
the reference loop, and a short CPU training run lowers the loss."""
import copy

import pytest
import torch
import transformers

import trelm_fast
import trelm_fast.models.base
from trelm_fast.ffn import TrelmFFN, ffn_modules, swap_ffn, unswap_ffn
from trelm_fast.losses import mlm_loss, sample_negatives
from trelm_fast.config import ModelConfig
from trelm_fast.model import build_mlm
from trelm_fast.models import adapter_for, adapter_for_type, supported_model_types
from trelm_fast.optim import TRELM_TRAINABLE, TrelmOptimizer, configure_trainable, parameter_group
from trelm_fast.routing import KnowledgeRouter, attribute, attribute_reference

V, D, I, L = 53, 32, 37, 3


def _bert_like(cfg_cls, **extra):
    def make(dropout):
        return cfg_cls(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=I,
                       max_position_embeddings=24, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                       **extra)
    return make


def _distilbert(dropout):
    return transformers.DistilBertConfig(vocab_size=V, dim=D, n_layers=L, n_heads=4, hidden_dim=I,
                                         max_position_embeddings=24, dropout=dropout, attention_dropout=dropout)


def _modernbert(dropout):  # layers 0 and 2 full attention, layer 1 a sliding window of 4; MLP biases on
    return transformers.ModernBertConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
                                         num_attention_heads=4, max_position_embeddings=24, global_attn_every_n_layers=2,
                                         local_attention=4, mlp_bias=True, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2, cls_token_id=1, sep_token_id=2, embedding_dropout=dropout,
                                         attention_dropout=dropout, mlp_dropout=dropout)


def _gpt2(dropout):
    return transformers.GPT2Config(vocab_size=V, n_embd=D, n_inner=I, n_layer=L, n_head=4, n_positions=24,
                                   resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)


def _llama(dropout):
    return transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
                                    attention_dropout=dropout)


# model_type -> (config maker(dropout), masked-LM / causal-LM class, attention implementations the family has)
FAMILIES = {
    "bert": (_bert_like(transformers.BertConfig), transformers.BertForMaskedLM, ("sdpa", "eager")),
    "roberta": (_bert_like(transformers.RobertaConfig, pad_token_id=1), transformers.RobertaForMaskedLM,
                ("sdpa", "eager")),
    "xlm-roberta": (_bert_like(transformers.XLMRobertaConfig, pad_token_id=1), transformers.XLMRobertaForMaskedLM,
                    ("sdpa", "eager")),
    "electra": (_bert_like(transformers.ElectraConfig, embedding_size=16), transformers.ElectraForMaskedLM,
                ("sdpa", "eager")),
    "distilbert": (_distilbert, transformers.DistilBertForMaskedLM, ("sdpa", "eager")),
    # DeBERTa-v3 style: relative attention with log buckets, no first-layer convolution
    "deberta-v2": (_bert_like(transformers.DebertaV2Config, relative_attention=True, position_buckets=8,
                              max_relative_positions=16, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                              position_biased_input=False),
                   transformers.DebertaV2ForMaskedLM, ("eager",)),
    # pre-LayerNorm, rotary, alternating global/sliding-window attention, fused gated MLP Wi = [G; W1]
    "modernbert": (_modernbert, transformers.ModernBertForMaskedLM, ("sdpa", "eager")),
    "llama": (_llama, transformers.LlamaForCausalLM, ("sdpa", "eager")),  # decoder, gated MLP, pre-RMSNorm
    "gpt2": (_gpt2, transformers.GPT2LMHeadModel, ("sdpa", "eager")),  # decoder, Conv1D weights stored [in, out]
}
ATTENTION = [(family, attn) for family, (_, _, attns) in FAMILIES.items() for attn in attns]


def _model(family, seed=0, dropout=0.1):
    make_cfg, cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return cls(make_cfg(dropout))


def _inputs(b=3, n=9, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def _labels(ids):
    labels = torch.full_like(ids, -100)
    labels[0, 2:4] = ids[0, 2:4]
    labels[0, 7] = ids[0, 7]
    labels[1, 4] = ids[1, 4]
    labels[2, 1] = ids[2, 1]
    return labels


def _loss(model, ids, mask, seed=1):
    torch.manual_seed(seed)  # the same dropout masks in both models
    logits = model(input_ids=ids, attention_mask=mask).logits
    return logits.float().pow(2).mean() + logits[..., 3].sum()


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _linear_view(site, t):
    """A projection's stored weight (or bias) in nn.Linear layout: GPT-2's Conv1D weights transposed back."""
    return t.t() if site.transposed and t.dim() == 2 else t


def _path_features(site, blocks, p):
    """The features of path p along a projection's neuron axis: b * I + p in each of its `blocks`."""
    return torch.cat([p + b * site.width for b in range(blocks)])


def _on_path(site, axis, blocks, t, p):
    """The part of a projection's weight- or bias-shaped tensor t that path p selects, as the slice
    leaves hold it (nn.Linear layout; along `axis`, the bias along its only axis)."""
    return _linear_view(site, t).index_select(axis if t.dim() == 2 else 0, _path_features(site, blocks, p))


def test_every_family_is_tested():
    assert set(supported_model_types()) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_split_reproduces_hf_forward(family):
    """The adapter's layer_context / attention / neurons / ffn_out chain is the HF encoder."""
    model = _model(family).eval()
    adapter = adapter_for(model)
    ids, mask = _inputs()
    with torch.no_grad():
        want = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        h = adapter.embedding_output(model, model.get_input_embeddings()(ids), mask)
        ctx = adapter.layer_context(model, mask, h)
        for layer in adapter.layers(model):
            a = adapter.attention(layer, h, ctx)
            h = adapter.ffn_out(layer, adapter.neurons(layer, a), a)
        h = adapter.final_norm(model, h)
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train", [False, True])
def test_swap_without_path_is_bit_identical(family, train):
    ref = _model(family)
    swapped = copy.deepcopy(ref)
    params = [id(p) for p in swapped.parameters()]
    trelm_fast.apply_trelm(swapped)
    assert len(ffn_modules(swapped)) == L and [id(p) for p in swapped.parameters()] == params  # shared, not copied
    assert list(ref.state_dict()) == list(swapped.state_dict())
    ref.train(train), swapped.train(train)
    ids, mask = _inputs()
    lr, ls = _loss(ref, ids, mask), _loss(swapped, ids, mask)
    assert torch.equal(lr, ls)
    lr.backward(), ls.backward()
    for (n, p), (n2, p2) in zip(ref.named_parameters(), swapped.named_parameters(), strict=True):
        assert n == n2 and (p.grad is None) == (p2.grad is None), n
        assert p.grad is None or torch.equal(p.grad, p2.grad), n
    unswap_ffn(swapped)
    assert not any(isinstance(m, TrelmFFN) for m in swapped.modules())
    adapter = adapter_for(swapped)
    assert type(adapter.ffn_site(adapter.layers(swapped)[0]).up.linear) is adapter.sliced_class().wraps
    assert [id(p) for p in swapped.parameters()] == params
    assert torch.equal(_loss(ref.eval(), ids, mask), _loss(swapped.eval(), ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_slice_gradients_are_the_dense_gradients_on_the_path(family):
    ref = _model(family, dropout=0.0)
    swapped = swap_ffn(copy.deepcopy(ref))
    paths = [torch.tensor([0, 5, 36]), torch.arange(I), torch.tensor([17])]
    for f, p in zip(ffn_modules(swapped), paths):
        f.set_path(p)
    ids, mask = _inputs()
    _loss(ref, ids, mask).backward()
    _loss(swapped, ids, mask).backward()
    adapter = adapter_for(ref)
    for f, layer, p in zip(ffn_modules(swapped), adapter.layers(ref), paths):
        site = adapter.ffn_site(layer)
        w1, w2 = site.up.linear, site.down.linear
        up_blocks = 2 if site.fused_gate else 1  # a fused gate [G; W1]: rows S and I + S
        assert _rel(f.slices.w1.grad, _on_path(site, 0, up_blocks, w1.weight.grad, p)) <= 1e-5
        assert _rel(f.slices.w2.grad, _on_path(site, 1, 1, w2.weight.grad, p)) <= 1e-5
        assert (f.slices.b1 is None) == (w1.bias is None) and (f.gate_slices is None) == (site.gate is None)
        if w1.bias is not None:
            assert _rel(f.slices.b1.grad, _on_path(site, 0, up_blocks, w1.bias.grad, p)) <= 1e-5
        if w2.bias is not None:
            assert _rel(f.down.bias.grad, w2.bias.grad) <= 1e-5
        if site.gate is not None:  # gated MLP: rows S of the gate too
            assert _rel(f.gate_slices.wg.grad, _on_path(site, 0, 1, site.gate.linear.weight.grad, p)) <= 1e-5
        assert all(lin.weight.grad is None for lin in f.linears)  # no full-size FFN weight gradient
    emb_ref, emb = ref.get_input_embeddings().weight.grad, swapped.get_input_embeddings().weight.grad
    assert _rel(emb, emb_ref) <= 1e-5  # the exact input gradient flows through every layer


def _attribution_batch(model, seed=1, K=6):
    ids, mask = _inputs()
    labels = _labels(ids)
    with torch.no_grad():
        hidden = adapter_for(model).embedding_output(model, model.get_input_embeddings()(ids), mask)
    targets = labels[labels != -100]
    neg = sample_negatives(targets, torch.ones(V) / V, K, torch.Generator().manual_seed(seed))
    return ids, hidden, mask, labels, neg


@pytest.mark.parametrize("family,attn", ATTENTION)
def test_fused_attribution_matches_reference(family, attn):
    model = swap_ffn(_model(family))
    model.set_attn_implementation(attn)
    _, hidden, mask, labels, neg = _attribution_batch(model)
    fused = attribute(model, hidden, mask, labels, neg, m=4, max_copies=5)
    ref = attribute_reference(model, hidden, mask, labels, neg, m=4)
    assert fused.scores.shape == (L, I) and fused.num_targets == 5 and fused.num_sequences == 3
    assert fused.scores.abs().max() > 0
    assert _rel(fused.scores, ref.scores) <= 1e-4
    assert fused.prob == pytest.approx(ref.prob)
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored


@pytest.mark.parametrize("family", FAMILIES)
def test_slice_optimizer_is_lazy_adamw_per_neuron(family):
    """Two steps with changing paths: TrelmOptimizer's update of every FFN projection (a fused gate's
    two halves, GPT-2's transposed weights) equals torch AdamW over one tensor per (neuron, weight or
    bias) that steps only while its neuron is on the path (no decay, no moments otherwise)."""
    hp = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.05)
    ref = _model(family, dropout=0.0)
    model = swap_ffn(copy.deepcopy(ref))
    configure_trainable(model, set())  # the path slices alone train
    configure_trainable(ref, {"ffn"})
    opt = TrelmOptimizer(model, **hp)
    adapter = adapter_for(ref)
    per_neuron = []  # (layer, neuron, stored weight or bias, axis, blocks, site, its lazy copy)
    for l, site in enumerate(adapter.ffn_site(layer) for layer in adapter.layers(ref)):
        for proj, axis, blocks in site.projections():
            lin = proj.linear
            for t in [lin.weight] + ([lin.bias] if axis == 0 and lin.bias is not None else []):
                for i in range(I):
                    copy_i = torch.nn.Parameter(_on_path(site, axis, blocks, t, torch.tensor([i])).detach().clone())
                    per_neuron.append((l, i, t, axis, blocks, site, copy_i))
    lazy = torch.optim.AdamW([{"params": [e[-1] for e in per_neuron if e[2].dim() == 2]},
                              {"params": [e[-1] for e in per_neuron if e[2].dim() == 1], "weight_decay": 0.0}],
                             foreach=False, **hp)
    steps = [[torch.tensor([0, 5, 36]), torch.arange(I), torch.tensor([17])],
             [torch.tensor([5, 6]), torch.tensor([2]), torch.tensor([0, 17, 30])]]
    ids, mask = _inputs()
    for paths in steps:
        for f, p in zip(ffn_modules(model), paths):
            f.set_path(p)
        _loss(model, ids, mask).backward()
        _loss(ref, ids, mask).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for l, i, t, axis, blocks, site, copy_i in per_neuron:
                on = i in paths[l].tolist()
                copy_i.grad = _on_path(site, axis, blocks, t.grad, torch.tensor([i])).clone() if on else None
            lazy.step()
            for l, i, t, axis, blocks, site, copy_i in per_neuron:
                dim = axis if t.dim() == 2 else 0
                _linear_view(site, t).index_copy_(dim, _path_features(site, blocks, torch.tensor([i])), copy_i)
        ref.zero_grad(set_to_none=True)
    init = _model(family).state_dict()
    trained = dict(model.named_parameters())
    moved = 0
    for name, p in ref.named_parameters():
        torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(p, init[name])
    assert moved == len({id(e[2]) for e in per_neuron})  # every sliced weight and bias, nothing else


@pytest.mark.parametrize("family", FAMILIES)
def test_short_training_run_lowers_the_loss(family):
    """Random init, TRELM mode with the embeddings frozen: only the head and the knowledge-path
    slices learn (decoders: the slices alone); 16 steps on one batch. Encoders: MLM loss at the
    targets; decoders: causal LM loss at the targets (read at t - 1)."""
    model = swap_ffn(_model(family, dropout=0.0))
    configure_trainable(model, TRELM_TRAINABLE - {"embeddings"})
    adapter = adapter_for(model)
    def rows_sliced(layer):  # (weight, its neuron dim) where features are neurons: up and a gate
        site = adapter.ffn_site(layer)
        return [(proj.linear.weight, site.neuron_dim(axis)) for proj, axis, _ in site.projections() if axis == 0]

    before = [[w.detach().clone() for w, _ in rows_sliced(layer)] for layer in adapter.layers(model)]
    opt = TrelmOptimizer(model, lr=1e-2)
    router = KnowledgeRouter(model, m=2, refresh=4, fraction=0.25)
    ids, hidden, mask, labels, neg = _attribution_batch(model)
    inputs = ids if adapter.causal else ids.masked_fill(labels != -100, 3)
    head = adapter.mlm_head(model)
    losses, selected = [], [set() for _ in range(L)]
    for step in range(16):
        if router.due(step):
            with torch.no_grad():
                hidden = adapter.embedding_output(model, model.get_input_embeddings()(inputs), mask)
            for f, p, seen in zip(ffn_modules(model), router.refresh(step, hidden, mask, labels, neg), selected):
                f.set_path(p)
                seen.update(p.tolist())
        h = model.base_model(input_ids=inputs, attention_mask=mask).last_hidden_state
        # decoders: causal LM at the targets, the state at t - 1 predicts the token at t
        loss = mlm_loss(h[:, :-1], labels[:, 1:], head) if adapter.causal else mlm_loss(h, labels, head)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for layer, w0s, seen in zip(adapter.layers(model), before, selected):
        for (w, dim), w0 in zip(rows_sliced(layer), w0s):
            changed = (w != w0).any(1 - dim)
            neurons = changed.nonzero().squeeze(1) % I  # a fused gate's feature I + s is neuron s
            assert changed.any() and set(neurons.tolist()) <= seen  # only path rows moved


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_groups_of_the_family(family):
    """What TRELM mode freezes is decided right for every family's parameter names."""
    model = _model(family)
    adapter = adapter_for(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for layer in adapter.layers(model):
        site = adapter.ffn_site(layer)
        ffn = [site.up.linear.weight, site.up.linear.bias, site.down.linear.weight]
        ffn += [] if site.gate is None else [site.gate.linear.weight, site.gate.linear.bias]
        assert {parameter_group(names[id(p)]) for p in ffn if p is not None} == {"ffn"}
        if site.down.linear.bias is not None:
            assert parameter_group(names[id(site.down.linear.bias)]) == "ffn_out_bias"
        assert all(parameter_group(names[id(p)]) in ("attention", "layernorm", "ffn", "ffn_out_bias")
                   for p in layer.parameters())
    assert parameter_group(names[id(model.get_input_embeddings().weight)]) == "embeddings"
    head = adapter.mlm_head(model)
    assert {parameter_group(names[id(p)]) for p in head.transform.parameters()} <= {"head"}  # Llama: none
    outside = {n for n, p in model.named_parameters() if parameter_group(n) == "other"}
    assert not outside, outside  # nothing of the model trains by accident in TRELM mode


def test_names_of_no_family_are_other():
    """Top-level and short names (the trainer's own parameters) fall through every family's rules."""
    for name in ("lambda0", "h", "layers", "norm_scale", "injection.weight", "head_bias"):
        assert parameter_group(name) == "other", name


UNSUPPORTED = {
    "albert": lambda: transformers.AlbertForMaskedLM(transformers.AlbertConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=4, intermediate_size=I,
        embedding_size=16)),
}


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_unsupported_family_raises_listing_the_supported_ones(model_type):
    model = UNSUPPORTED[model_type]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"swap_ffn: model_type '{model_type}' is not supported \(supported: bert, "):
        trelm_fast.apply_trelm(model)
    with pytest.raises(ValueError, match=f"routing: model_type '{model_type}'"):
        KnowledgeRouter(model)
    assert not any(isinstance(m, TrelmFFN) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_transformers_outside_the_supported_range_is_named(monkeypatch):
    model = _model("bert")
    monkeypatch.setattr(trelm_fast.models.base.transformers, "__version__", "4.40.0")
    with pytest.raises(RuntimeError, match=r"transformers 4.40.0 is installed; the bert adapter supports "
                                           r"transformers >= 5.0, < 6.0"):
        swap_ffn(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_init_takes_every_size_field(family, tmp_path):
    """build_mlm sets model.* sizes through the family's own config attributes (DistilBERT's FFN width
    is `hidden_dim` and GPT-2's `n_inner`, outside their attribute_maps: setting `intermediate_size`
    there changed nothing)."""
    FAMILIES[family][0](0.0).save_pretrained(tmp_path)  # the family's config.json, other sizes
    sizes = {"hidden_size": 24, "num_layers": 2, "num_heads": 2, "intermediate_size": 29, "max_position_embeddings": 40}
    mlm = build_mlm(ModelConfig(path=str(tmp_path), init="random", **sizes))
    adapter = adapter_for_type(family)
    layers = adapter.layers(mlm)
    site = adapter.ffn_site(layers[0])  # W2 [d, I] (a fused gate's up projection is [2I, d])
    assert (len(layers), *site.linear_weight(site.down).shape) == (2, 24, 29)
    assert mlm.get_input_embeddings().num_embeddings == V


def test_llama_head_count_override_keeps_multi_head_attention(tmp_path):
    """A directory with as many key/value heads as heads (Llama's default) stays so under a new
    model.num_heads; a grouped-query one that the new count breaks is refused by name."""
    transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=1,
                             num_attention_heads=8).save_pretrained(tmp_path / "mha")
    mlm = build_mlm(ModelConfig(path=str(tmp_path / "mha"), init="random", num_heads=4))
    assert (mlm.config.num_attention_heads, mlm.config.num_key_value_heads) == (4, 4)
    ids = torch.randint(0, V, (2, 5))
    assert mlm(input_ids=ids).logits.shape == (2, 5, V)
    FAMILIES["llama"][0](0.0).save_pretrained(tmp_path / "gqa")  # 4 heads, 2 key/value heads
    with pytest.raises(ValueError, match="model.num_heads 1 is not a multiple of the config's num_key_value_heads 2"):
        build_mlm(ModelConfig(path=str(tmp_path / "gqa"), init="random", num_heads=1))


def test_electra_discriminator_swaps_but_has_no_mlm_head():
    make_cfg, _, _ = FAMILIES["electra"]
    disc = transformers.ElectraForPreTraining(make_cfg(0.0))
    swap_ffn(disc)
    assert len(ffn_modules(disc)) == L
    with pytest.raises(TypeError, match="ElectraForPreTraining has no MLM head"):
        adapter_for(disc).mlm_head(disc)
