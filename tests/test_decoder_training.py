"""Decoders (GPT-2, Llama) through the trainer: causal batches, the causal LM + CKA objective against a
plain PyTorch reference on the HF logits, routing targets that line up with the loss, the bank's
context state, the probe, a short TRELM run that lowers the loss, and train.py end to end.
docs/models.md "Decoders in the trainer" states the objective."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from trelm_fast import train as train_mod
from trelm_fast.checkpoint import load_checkpoint
from trelm_fast.config import load_config
from trelm_fast.data.base_model import load_tokenizer
from trelm_fast.data.loader import MLMCollator, TrelmDataset
from trelm_fast.model import build_mlm
from trelm_fast.routing.attribution import select_targets
from trelm_fast.step import build_step_model, make_step
from test_train import one_thread  # noqa: F401  (autouse: tiny models lose to intra-op threads)

SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, max_position_embeddings=128)
STEP = ["model.dropout=0.0", "kmb.window=2", "loss.num_negatives=5", "routing.m=3", "routing.fraction=0.25",
        "routing.refresh=4", "schedule.warmup_steps=0", "train.batch_size=4"]
DECODERS = {  # config.json of the tiny random decoders; vocabulary: the dataset tokenizer's
    "gpt2": lambda v: transformers.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_inner=48,
                                              n_positions=128),
    "llama": lambda v: transformers.LlamaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
                                                max_position_embeddings=128),
}


def decoder_dir(root: Path, family: str, tokenizer_dir: Path, **config) -> Path:
    """A model directory: the family's tiny config.json and the dataset's tokenizer files."""
    d = root / family
    tok = load_tokenizer(str(tokenizer_dir))
    tok.save_pretrained(str(d))
    cfg = DECODERS[family](len(tok))
    for key, value in config.items():
        setattr(cfg, key, value)
    cfg.save_pretrained(str(d))
    return d


def dataset_tokenizer(tiny_dir: Path) -> Path:
    """The tokenizer the tiny dataset was built with (MiniLM's; the manifest records its identity)."""
    from trelm_fast.config import resolve_model_path
    from trelm_fast.data.base_model import tokenizer_identity
    from trelm_fast.data.loader import load_manifest

    path = resolve_model_path("minilm")
    want = load_manifest(tiny_dir, verify=False)["tokenizer"]["vocab_sha256"]
    assert tokenizer_identity(load_tokenizer(str(path)))["vocab_sha256"] == want
    return path


def decoder_config(tmp_path, tiny_dir, family, *extra):
    path = decoder_dir(tmp_path, family, dataset_tokenizer(tiny_dir))
    return load_config(None, STEP + [f"model.path={path}", f"data.dir={tiny_dir}", "model.init=random",
                                     *[f"model.{k}={v}" for k, v in SIZES.items()], *extra])


def causal_batches(tiny_dir, cfg, count):
    ds = TrelmDataset(tiny_dir, "train", verify=False)
    collate = MLMCollator.for_config(ds.manifest, cfg, causal=True)
    bs = cfg.train.batch_size
    return [collate([ds[(0, i)] for i in range(b * bs, (b + 1) * bs)]) for b in range(count)]


def setup(tmp_path, tiny_dir, family, method="trelm", *extra):
    cfg = decoder_config(tmp_path, tiny_dir, family, *extra)
    torch.manual_seed(0)
    model = build_step_model(method, cfg, tiny_dir)
    return cfg, model, make_step(method, model, cfg)


# ------------------------------------------------------------------------------------------- batches

def test_causal_batches_mask_nothing_and_label_every_ordinary_token(tiny_dir):
    cfg = load_config(None, [f"data.dir={tiny_dir}"])
    ds = TrelmDataset(tiny_dir, "train", verify=False)
    samples = [ds[(0, i)] for i in range(3)]
    batch = MLMCollator.for_config(ds.manifest, cfg, causal=True)(samples)
    masked = MLMCollator.for_config(ds.manifest, cfg)(samples)
    assert torch.equal(batch["input_ids"], torch.stack([s["input_ids"] for s in samples]))  # no [MASK]
    assert torch.equal(batch["cka_labels"], masked["cka_labels"])  # the same knowledge targets
    for row, s in enumerate(samples):
        ordinary = torch.zeros(batch["input_ids"].shape[1], dtype=torch.bool)
        ordinary[1:s["length"] - 1] = True  # not [CLS] / [SEP] / padding
        ordinary &= batch["cka_labels"][row] == -100
        labelled = batch["mlm_labels"][row] != -100
        assert torch.equal(labelled, ordinary)
        assert torch.equal(batch["mlm_labels"][row][labelled], s["input_ids"][labelled])
    # the loss reads each label at the state one position earlier
    assert batch["label_shift"] == 1 and masked["label_shift"] == 0
    n = batch["input_ids"].shape[1]
    rows, cols = (batch["cka_labels"] != -100).nonzero(as_tuple=True)
    assert torch.equal(batch["cka_positions"], rows * n + cols - 1)
    assert torch.equal(batch["cka_targets"], batch["input_ids"][rows, cols])


def test_decoder_batches_refuse_labels_in_column_0_and_a_step_refuses_masked_lm_batches(tmp_path, tiny_dir):
    cfg, model, step = setup(tmp_path, tiny_dir, "gpt2", "no_routing")
    batch = causal_batches(tiny_dir, cfg, 1)[0]
    raw = {k: batch[k] for k in ("input_ids", "attention_mask", "mlm_labels", "cka_labels", "entity_spans",
                                 "target_spans", "target_triples")}
    raw["mlm_labels"] = raw["mlm_labels"].clone()
    raw["mlm_labels"][0, 0] = 5
    with pytest.raises(ValueError, match="mlm_labels: a decoder predicts .* column 0 must not be labelled"):
        step.prepare(raw)
    ds = TrelmDataset(tiny_dir, "train", verify=False)
    masked = MLMCollator.for_config(ds.manifest, cfg)([ds[(0, 0)]])
    with pytest.raises(ValueError, match="label_shift 0, but the model is a decoder"):
        step.prepare(masked)


# ------------------------------------------------------------------------------------------- the objective

@pytest.mark.parametrize("family", sorted(DECODERS))
@pytest.mark.parametrize("method", ["trelm", "dense"])
def test_causal_loss_equals_shifted_cross_entropy_of_the_hf_logits(tmp_path, tiny_dir, family, method):
    """LM loss: next-token cross-entropy over the ordinary tokens; CKA: the sampled softmax of eq. 2 at
    the target tokens, both read from the state one position earlier; the reference is computed from
    the Hugging Face causal LM's own logits (with the injected input embeddings and a padded row)."""
    cfg, model, step = setup(tmp_path, tiny_dir, family, method)
    batch = step.prepare(causal_batches(tiny_dir, cfg, 1)[0])
    # padded rows: the step's attention mask must keep the causal mask
    assert batch["tokens"] < batch["input_ids"].numel() and batch["cka_targets"].numel() > 0
    model.eval()
    micro = step.accumulate(batch, 0.0)

    with torch.no_grad():
        logits = model.mlm(inputs_embeds=model.input_embeddings(batch), attention_mask=batch["attention_mask"]).logits
    pred, mlm_labels, cka_labels = logits[:, :-1], batch["mlm_labels"][:, 1:], batch["cka_labels"][:, 1:]
    ref_mlm = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), mlm_labels.reshape(-1))
    at = cka_labels != -100
    tokens = torch.cat([cka_labels[at][:, None], batch["cka_negatives"]], 1)
    scores = pred[at].gather(1, tokens)  # no output bias in either family: the logits are the scores
    scores[:, 1:] = scores[:, 1:].masked_fill(tokens[:, 1:] == tokens[:, :1], float("-inf"))
    ref_cka = -torch.log_softmax(scores, 1)[:, 0].mean()
    torch.testing.assert_close(micro.mlm, ref_mlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(micro.cka, ref_cka, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(micro.total, 0.5 * ref_mlm + 0.5 * ref_cka, rtol=1e-5, atol=1e-5)


def test_routing_targets_are_the_loss_positions(tmp_path, tiny_dir):
    """The router attributes P_x at the very positions, labels and negatives the CKA loss reads."""
    cfg, model, step = setup(tmp_path, tiny_dir, "llama")
    batch = step.prepare(causal_batches(tiny_dir, cfg, 1)[0])
    with torch.no_grad():
        hidden = model.embedding_output(batch)
    t = select_targets(hidden, batch["attention_mask"], batch["cka_labels"], batch["cka_negatives"], 0,
                       model.adapter.causal)
    kept = (batch["cka_labels"] != -100).any(1).nonzero().squeeze(1)  # the sequences with targets
    n = batch["input_ids"].shape[1]
    assert torch.equal(kept[t.rows] * n + t.cols, batch["cka_positions"])
    assert torch.equal(t.labels, batch["cka_targets"])
    assert torch.equal(t.negatives, batch["cka_negatives"])


def test_decoder_bank_global_memory_reads_the_last_real_token(tmp_path, tiny_dir):
    cfg, model, step = setup(tmp_path, tiny_dir, "gpt2")
    batch = step.prepare(causal_batches(tiny_dir, cfg, 1)[0])
    model.eval()
    micro = step.accumulate(batch, 0.0)
    bank = model.bank
    assert int(bank.counts.sum()) == 0
    step.update_bank([micro], 0.0, None)
    spans, lengths = batch["entity_spans"], batch["lengths"]
    once = [i for i in range(spans.shape[0]) if int((spans[:, 3] == spans[i, 3]).sum()) == 1]
    assert once
    for i in once:  # an entity seen in one context: its global memory is that context's state
        row, ent = int(spans[i, 0]), int(spans[i, 3])
        torch.testing.assert_close(bank.global_mean[bank.slots(torch.tensor([ent]))[0]],
                                   micro.hidden[row, int(lengths[row]) - 1])


def test_decoder_probe_predicts_from_the_query_before_the_object(tmp_path, tiny_dir):
    """P@1 for a decoder: the prediction for [Y] is what the LM predicts after the query's prefix alone."""
    from trelm_fast.data.loader import load_probes
    from trelm_fast.probe import evaluate_probes

    cfg = decoder_config(tmp_path, tiny_dir, "llama")
    torch.manual_seed(0)
    mlm = build_mlm(cfg.model).eval()
    tok = load_tokenizer(cfg.model.path)
    result = evaluate_probes(mlm, tok, load_probes(tiny_dir)[:12])
    assert result.predictions
    for fact, predicted in result.predictions:
        ids = tok(fact.cloze(tok.mask_token), return_tensors="pt")["input_ids"]
        prefix = ids[:, :int((ids[0] == tok.mask_token_id).nonzero())]
        with torch.no_grad():
            expected = mlm(input_ids=prefix).logits[0, -1].argmax()
        assert predicted == tok.convert_ids_to_tokens(int(expected))


# ------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("family", sorted(DECODERS))
def test_trelm_steps_lower_the_causal_loss(tmp_path, tiny_dir, family):
    """Random init, method trelm (injection, memory bank, routing refreshed every 4 steps; the path
    slices, the injection and the tied output embeddings train, the final norm is frozen): 32 steps
    over two batches of the tiny dataset lower the LM and the CKA loss (6.04 -> 0.28 in total for
    GPT-2, 6.01 -> 0.61 for Llama, seeded; with the embeddings frozen, `method.trainable=[head,other]`,
    the logits stay small and it falls slowly: 6.07 -> 5.78 and 6.05 -> 5.74)."""
    cfg, model, step = setup(tmp_path, tiny_dir, family, "trelm", "optim.lr=3e-2")
    data = causal_batches(tiny_dir, cfg, 2)
    results = [step(data[i % 2], i).scalars() for i in range(32)]

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    for key in ("mlm_loss", "cka_loss"):  # each batch once at either end
        assert mean(key, results[-2:]) < mean(key, results[:2]) - 0.1, [r[key] for r in results]
    assert mean("loss", results[-2:]) < mean("loss", results[:2]) - 0.2
    assert step.paths is not None and int(model.bank.counts.sum()) > 0


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_train_main_runs_a_decoder_end_to_end(tmp_path, tiny_dir, family, capsys):
    from transformers import AutoModelForCausalLM

    from trelm_fast import probe

    path = decoder_dir(tmp_path, family, dataset_tokenizer(tiny_dir))
    out = tmp_path / "run"
    argv = [f"model.path={path}", f"data.dir={tiny_dir}", f"out_dir={out}", "model.init=random",
            *[f"model.{k}={v}" for k, v in SIZES.items()], "loss.num_negatives=5", "routing.m=3",
            "routing.fraction=0.25", "routing.refresh=2", "train.batch_size=4", "train.steps=2", "train.log_every=1"]
    assert train_mod.main(argv) == 0
    ck = load_checkpoint(out / "checkpoints")
    assert ck.step == 2 and ck.state["run"]["model.model_type"] == family
    assert ck.state["step"]["paths"] is not None and "bank" in ck.state
    exported = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    assert exported.config.model_type == family
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "probe_after" in summary
    # the probe CLI loads the export as a causal LM and scores the state before [Y], as the trainer did
    capsys.readouterr()
    assert probe.main(["--model", str(out / "model"), "--probes", str(tiny_dir / "probes.jsonl")]) == 0
    macro = [line for line in capsys.readouterr().out.splitlines() if line.startswith("macro")][0]
    assert float(macro.split()[-1]) == pytest.approx(summary["probe_after"], abs=5e-4)


def test_pretrained_untied_decoder_keeps_its_lm_head(tmp_path, tiny_dir):
    """A pre-trained Llama whose checkpoint has its own lm_head keeps it (tying would discard it)."""
    path = decoder_dir(tmp_path, "llama", dataset_tokenizer(tiny_dir), tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(path)).save_pretrained(path)
    saved = transformers.LlamaForCausalLM.from_pretrained(path)
    mlm = build_mlm(load_config(None, [f"model.path={path}", "model.init=pretrained",
                                       f"data.dir={tmp_path / 'none'}"]).model)
    assert mlm.lm_head.weight is not mlm.get_input_embeddings().weight
    assert torch.equal(mlm.lm_head.weight, saved.lm_head.weight)
    random = build_mlm(load_config(None, [f"model.path={path}", "model.init=random",
                                          f"data.dir={tmp_path / 'none'}"]).model)
    assert random.lm_head.weight is random.get_input_embeddings().weight  # a random init is tied
