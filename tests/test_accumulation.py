"""Gradient accumulation (train.grad_accum_steps) and clipping (train.max_grad_norm) of TrainStep."""
import pytest
import torch

from test_model import make_batch, setup_step
from trelm_fast.data.prepare import prepare_batch
from trelm_fast.precision import clip_grad_norm
from trelm_fast.step import item_counts, share_of_items

ROW_KEYS = ("input_ids", "attention_mask", "mlm_labels", "cka_labels")


def rows(batch: dict, lo: int, hi: int) -> dict:
    """The sub-batch of rows [lo, hi) of ``batch``, span row ids renumbered from 0."""
    out = {k: batch[k][lo:hi] for k in ROW_KEYS}
    for key in ("entity_spans", "target_spans"):
        keep = (batch[key][:, 0] >= lo) & (batch[key][:, 0] < hi)
        out[key] = batch[key][keep] - torch.tensor([lo, 0, 0, 0])
        if key == "target_spans":
            out["target_triples"] = batch["target_triples"][keep]
    return out


def prepared(batch: dict, k: int = 5, vocab: int = 3000) -> dict:
    """``batch`` with its index fields and CKA negatives that depend only on each target token (so a
    batch and its parts get the same ones)."""
    out = prepare_batch(batch)
    out["cka_negatives"] = (out["cka_targets"][:, None] * 7 + torch.arange(1, k + 1)) % vocab
    return out


def grads(step) -> list[torch.Tensor]:
    return [t.grad.clone() for t in step.optimizer.trained_tensors()]


@pytest.mark.parametrize("method", ["trelm", "dense", "dense_opt"])
def test_micro_batches_give_the_gradient_of_their_concatenation(method, dataset):
    """k = 3 micro-batches of 2, 1 and 3 rows == one batch of 6 rows (fp32, same paths)."""
    raw = make_batch(seed=11, B=6)
    big, parts = prepared(raw), [prepared(rows(raw, 0, 2)), prepared(rows(raw, 2, 3)), prepared(rows(raw, 3, 6))]
    assert sum(item_counts(p)[1] for p in parts) == item_counts(big)[1] > 0

    cfg, model, step = setup_step(method, dataset)
    step.begin(big, 0, 0.0)  # paths from the whole batch, used by both
    whole = step.accumulate(big, 0.0)
    want = grads(step)
    step.optimizer.zero_grad()
    weights = share_of_items([item_counts(p) for p in parts])
    micro = [step.accumulate(p, 0.0, w) for p, w in zip(parts, weights)]
    got = grads(step)

    assert len(got) == len(want) and len(got) > 2
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):  # fp32 sums in another order: errors relative to the gradients' scale
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale)
    for name in ("total", "mlm", "cka"):
        torch.testing.assert_close(sum(getattr(m, name) for m in micro), getattr(whole, name), rtol=1e-6, atol=1e-7)


def test_train_step_with_micro_batches_updates_as_one_batch(dataset):
    """step([parts]) and step(whole) from the same state: same loss, same parameters after."""
    raw = make_batch(seed=12, B=4)
    big, parts = prepared(raw), [prepared(rows(raw, 0, 1)), prepared(rows(raw, 1, 4))]
    results, params = [], []
    for batch in (big, parts):
        cfg, model, step = setup_step("trelm", dataset, "routing.refresh=100")
        step(prepared(make_batch(seed=3, B=4)), 0)  # the same first step: paths and optimizer state
        results.append(step(batch, 1).scalars())
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert not results[0]["skipped_nonfinite"] and not results[1]["skipped_nonfinite"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    for n, p in params[0].items():
        torch.testing.assert_close(params[1][n], p, rtol=0, atol=1e-6, msg=n)


def test_share_of_items():
    assert share_of_items([(3, 0), (1, 0)]) == [(0.75, 0.0), (0.25, 0.0)]


def test_clipping_matches_clip_grad_norm_on_the_equivalent_dense_gradients(dataset):
    """Slice + dense clipping == torch.nn.utils.clip_grad_norm_ over the dense FFN gradients masked to
    the paths (what trelm_naive trains) and the other trained parameters."""
    batch = prepared(make_batch(seed=13, B=3))
    _, model, step = setup_step("trelm", dataset)
    step.begin(batch, 0, 0.0)
    step.accumulate(batch, 0.0)
    _, ref_model, ref = setup_step("trelm_naive", dataset)
    ref_model.load_state_dict(model.state_dict())
    ref.paths = ref.router.paths = step.paths
    ref.optimizer.zero_grad()
    ref.accumulate(batch, 0.0)
    ref._mask_to_paths()

    ref_params = [p for p in ref.optimizer.trained_tensors() if p.grad is not None]
    max_norm = 0.05
    want = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
    got = clip_grad_norm(step.optimizer, max_norm)
    assert float(want) > 2 * max_norm  # the clip is active
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)

    clipped = dict(ref_model.named_parameters())
    layers = ref_model.mlm.bert.encoder.layer
    for layer_idx, path in zip(step.router.layers, step.paths):
        ffn = model.mlm.bert.encoder.layer[layer_idx].trelm_ffn
        torch.testing.assert_close(ffn.slices.w1.grad, layers[layer_idx].intermediate.dense.weight.grad[path])
        torch.testing.assert_close(ffn.slices.w2.grad, layers[layer_idx].output.dense.weight.grad[:, path])
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, clipped[n].grad, msg=n)
    assert torch.linalg.vector_norm(torch.cat([t.grad.flatten() for t in step.optimizer.trained_tensors()])) \
        == pytest.approx(max_norm, rel=1e-4)


def test_no_clipping_at_zero(dataset):
    _, _, step = setup_step("trelm", dataset)
    batch = prepared(make_batch(seed=14))
    step.begin(batch, 0, 0.0)
    step.accumulate(batch, 0.0)
    before = grads(step)
    assert clip_grad_norm(step.optimizer, 0.0) is None
    assert all(torch.equal(a, b) for a, b in zip(before, grads(step)))


@pytest.mark.slow
def test_trainer_accumulation_reads_the_same_sequences_as_one_big_batch(tmp_path, tiny_dir):
    """train.py: batch_size 2 x grad_accum_steps 2 == batch_size 4 (dense_opt, no dropout: the
    sequences, masks and updates are the same, so the logged losses are)."""
    from test_train import TINY, metrics
    from trelm_fast import train as train_mod

    losses = []
    for name, extra in (("big", ["train.batch_size=4"]), ("accum", ["train.batch_size=2", "train.grad_accum_steps=2"])):
        out = tmp_path / name
        argv = TINY + [f"data.dir={tiny_dir}", f"out_dir={out}", "method.name=dense_opt", "model.dropout=0.0",
                       "train.steps=3", "train.eval_every=100", *extra]
        assert train_mod.main(argv) == 0
        losses.append([metrics(out)[s]["loss"] for s in (1, 2, 3)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_trainer_logs_the_norm_it_clips(tmp_path, tiny_dir):
    from test_train import TINY, metrics
    from trelm_fast import train as train_mod

    out = tmp_path / "clip"
    assert train_mod.main(TINY + [f"data.dir={tiny_dir}", f"out_dir={out}", "train.steps=2", "train.max_grad_norm=0.5",
                                  "train.eval_every=100"]) == 0
    assert all(metrics(out)[s]["grad_norm"] > 0 for s in (1, 2))

