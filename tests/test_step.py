"""TrainStep: a few steps of every method and ablation on a tiny model; sparse updates; skips."""
import copy
from datetime import timedelta
import math

import pytest
import torch

from test_model import make_batch, setup_step, tiny_config
from trelm_fast.config import METHODS
from trelm_fast.losses import MLMHead, cka_loss, mlm_loss
from trelm_fast.step import METHOD_SPECS, build_step_model, lr_at, make_step, method_spec


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_every_config_method_has_a_spec():
    assert set(METHODS) == set(METHOD_SPECS)
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("magic")


@pytest.mark.parametrize("method", sorted(METHOD_SPECS))
def test_a_few_steps_of_each_method(method, dataset):
    cfg, model, step = setup_step(method, dataset)
    before = _snapshot(model)
    results = [step(make_batch(seed=i), i) for i in range(2)]
    for r in results:
        assert not r.skipped_nonfinite
        assert math.isfinite(r.loss) and float(r.loss) > 0
        assert r.stats["lr"] > 0
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, f"{method}: no parameter changed"
    assert step.steps_done == 2
    spec = method_spec(method)
    if spec.bank:
        assert (model.bank.counts > 0).any()
    if spec.routing is not None:
        assert step.paths is not None and "time/attribution_s" in results[0].stats


def test_dense_loss_is_stock_full_vocabulary_mlm_plus_cka(dataset):
    cfg, model, step = setup_step("dense", dataset)
    batch = step.prepare(make_batch(seed=5))
    model.eval()
    negatives = batch["cka_negatives"]
    total, mlm, cka, hidden = step._objective(batch, 0.0)
    head = MLMHead.from_model(model.mlm)
    logits = head.logits(hidden)  # [B, n, V] at every position, as stock transformers
    ref_mlm = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), batch["mlm_labels"].view(-1))
    torch.testing.assert_close(mlm, ref_mlm)
    torch.testing.assert_close(mlm, mlm_loss(hidden, batch["mlm_labels"], head))  # same value, cheaper
    torch.testing.assert_close(cka, cka_loss(hidden, batch["cka_labels"], negatives, head))
    torch.testing.assert_close(total, 0.5 * ref_mlm + 0.5 * cka)


def test_hf_dense_is_stock_mlm(dataset):
    cfg, model, step = setup_step("hf_dense", dataset)
    batch = step.prepare(make_batch(seed=6))
    model.eval()
    total, mlm, cka, _ = step._objective(batch, 0.0)
    ref = model.mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["mlm_labels"]).loss
    torch.testing.assert_close(total, ref)
    # dense_opt computes the same loss with logits only at labelled positions
    _, model2, step2 = setup_step("dense_opt", dataset)
    model2.load_state_dict(model.state_dict())
    model2.eval()
    total2, *_ = step2._objective(batch, 0.0)
    torch.testing.assert_close(total2, ref)


def test_nonfinite_loss_skips_the_update(dataset):
    cfg, model, step = setup_step("no_routing", dataset)
    step(make_batch(seed=0), 0)
    before = _snapshot(model)
    bank_before = model.bank.local.clone()
    opt_state = {k: v["exp_avg"].clone() for k, v in enumerate(step.optimizer.dense.state.values())}
    with torch.no_grad():
        model.mlm.cls.predictions.bias.fill_(float("nan"))
    bias_nan = model.mlm.cls.predictions.bias.detach().clone()
    r = step(make_batch(seed=1), 1)
    assert r.skipped_nonfinite and not math.isfinite(r.loss)
    assert step.nonfinite_total == 1
    assert [(i, skipped) for i, skipped, _ in step.nonfinite_events()] == [(0, False), (1, True)]
    after = _snapshot(model)
    for n in before:
        if n != "mlm.cls.predictions.bias":
            assert torch.equal(before[n], after[n]), n
    assert torch.equal(after["mlm.cls.predictions.bias"].isnan(), bias_nan.isnan())
    assert torch.equal(model.bank.local, bank_before)
    for k, v in enumerate(step.optimizer.dense.state.values()):
        assert torch.equal(v["exp_avg"], opt_state[k])
    assert all(p.grad is None for p in model.parameters())


def test_lr_schedule():
    cfg = tiny_config("schedule.warmup_steps=4", "train.steps=14", "optim.lr=1.0", "schedule.kind=linear")
    assert [round(lr_at(cfg, i), 3) for i in (0, 3, 4, 9, 14)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    cfg = tiny_config("schedule.warmup_steps=0", "train.steps=10", "optim.lr=1.0", "schedule.kind=cosine")
    assert lr_at(cfg, 5) == pytest.approx(0.5)
    cfg = tiny_config("schedule.kind=constant", "optim.lr=0.3")
    assert lr_at(cfg, 100) == pytest.approx(0.3)


def test_step_rejects_model_built_for_another_method(dataset):
    cfg = tiny_config()
    model = build_step_model("hf_dense", cfg, dataset)
    with pytest.raises(ValueError, match="inject=True"):
        make_step("dense", model, cfg)


def test_state_dict_round_trip_continues_identically(dataset):
    cfg, model, step = setup_step("no_routing", dataset)
    for i in range(2):
        step(make_batch(seed=i), i)
    state = copy.deepcopy(step.state_dict())  # what a checkpoint writes: a copy, not live tensors
    params = copy.deepcopy(model.state_dict())
    bank = copy.deepcopy(model.bank.state_dict())
    r_a = [step(make_batch(seed=i), i).loss for i in (2, 3)]
    _, model2, step2 = setup_step("no_routing", dataset)
    model2.load_state_dict(params)
    model2.bank.load_state_dict(bank)
    step2.load_state_dict(state)
    r_b = [step2(make_batch(seed=i), i).loss for i in (2, 3)]
    assert r_a == r_b


def _ffn_changes(model, before, after):
    """{layer: (changed W1 rows, changed b1 rows, changed W2 cols)} as sorted lists."""
    out = {}
    for i in range(model.mlm.config.num_hidden_layers):
        pre = f"mlm.bert.encoder.layer.{i}."
        w1 = (after[pre + "intermediate.dense.weight"] != before[pre + "intermediate.dense.weight"]).any(1)
        b1 = after[pre + "intermediate.dense.bias"] != before[pre + "intermediate.dense.bias"]
        w2 = (after[pre + "output.dense.weight"] != before[pre + "output.dense.weight"]).any(0)
        out[i] = tuple(t.nonzero().flatten().tolist() for t in (w1, b1, w2))
    return out


@pytest.mark.parametrize("method, extra", [
    ("trelm", ()),
    ("trelm", ("routing.rule=random",)),  # the control: paths drawn without attribution
    ("trelm_naive", ("optim.weight_decay=0",)),  # masked dense gradients + AdamW: no decay drift
    ("no_kmb", ("routing.layers=[1]",)),
])
def test_path_methods_update_only_path_rows_and_columns(method, extra, dataset):
    cfg, model, step = setup_step(method, dataset, *extra)
    before = _snapshot(model)
    step(make_batch(seed=3), 0)
    after = _snapshot(model)
    paths = dict(zip(step.router.layers, [p.tolist() for p in step.paths]))
    k = round(cfg.routing.fraction * model.mlm.config.intermediate_size)
    assert all(len(p) == k for p in paths.values())
    for i, (w1, b1, w2) in _ffn_changes(model, before, after).items():
        expected = paths.get(i, [])
        assert set(w1) <= set(expected) and set(w2) <= set(expected) and set(b1) <= set(expected)
        if expected:  # Adam moves every selected row by about lr on its first step
            assert w1 == expected and w2 == expected
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    ffn = {n for n in changed if ".intermediate.dense." in n or n.endswith("output.dense.weight")
           and ".attention." not in n}
    others = changed - ffn
    trained = ("mlm.cls.", "mlm.bert.embeddings.", "injection.")  # MLM head, embeddings, knowledge projection
    assert all(n.startswith(trained) for n in others), sorted(others)
    assert all(any(n.startswith(group) for n in others) for group in trained), sorted(others)


def test_paths_refresh_every_R_steps_and_state_round_trips(dataset):
    cfg, model, step = setup_step("trelm", dataset, "routing.refresh=2")
    r0 = step(make_batch(seed=0), 0)
    r1 = step(make_batch(seed=1), 1)
    assert "time/attribution_s" in r0.stats and "time/attribution_s" not in r1.stats
    state = copy.deepcopy(step.state_dict())
    params = copy.deepcopy(model.state_dict())
    bank = copy.deepcopy(model.bank.state_dict())
    losses_a = [step(make_batch(seed=i), i).loss for i in (2, 3)]
    paths_a = [p.clone() for p in step.paths]
    _, model2, step2 = setup_step("trelm", dataset, "routing.refresh=2")
    model2.load_state_dict(params)
    model2.bank.load_state_dict(bank)
    step2.load_state_dict(state)
    losses_b = [step2(make_batch(seed=i), i).loss for i in (2, 3)]
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(paths_a, step2.paths))
    with pytest.raises(ValueError, match="method"):
        make_step("no_kmb", build_step_model("no_kmb", cfg, dataset), cfg).load_state_dict(state)


def _ddp_worker(rank, world, init_file, dataset, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        cfg = tiny_config()
        for method in ("trelm", "dense"):
            torch.manual_seed(0)  # same initial weights on every rank
            model = build_step_model(method, cfg, dataset)
            step = make_step(method, model, cfg)
            for i in range(2):
                r = step(make_batch(seed=10 * i + rank), i)  # different data per rank
                assert not r.skipped_nonfinite
            state = {"params": {n: p.detach() for n, p in model.named_parameters()},
                     "bank": model.bank.local.clone(), "paths": step.paths}
            torch.save(state, f"{out}/{method}{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_ranks_agree(dataset, tmp_path):
    """2 gloo ranks, different batches: weights, memory bank and paths stay identical."""
    from ranks import spawn_ranks

    spawn_ranks(_ddp_worker, (2, str(tmp_path / "init"), dataset, str(tmp_path)), 2)
    for method in ("trelm", "dense"):
        a, b = (torch.load(tmp_path / f"{method}{r}.pt", weights_only=True) for r in (0, 1))
        for n in a["params"]:
            torch.testing.assert_close(a["params"][n], b["params"][n], rtol=0, atol=1e-6, msg=f"{method} {n}")
        torch.testing.assert_close(a["bank"], b["bank"], rtol=0, atol=1e-6)
        if method == "trelm":
            assert all(torch.equal(p, q) for p, q in zip(a["paths"], b["paths"]))


def test_batch_without_targets_keeps_paths(dataset):
    cfg, model, step = setup_step("trelm", dataset, "routing.refresh=1")
    step(make_batch(seed=0), 0)
    paths = [p.clone() for p in step.paths]
    batch = make_batch(seed=1)
    batch["cka_labels"].fill_(-100)
    batch["target_spans"] = batch["target_spans"][:0]
    batch["target_triples"] = batch["target_triples"][:0]
    r = step(batch, 1)
    assert not r.skipped_nonfinite and float(r.cka_loss) == 0.0 and "time/attribution_s" not in r.stats
    assert all(torch.equal(a, b) for a, b in zip(paths, step.paths))


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["trelm", "dense", "trelm_naive"])
def test_steps_on_cuda(method, dataset):
    cfg = tiny_config()
    model = build_step_model(method, cfg, dataset, device="cuda")
    step = make_step(method, model, cfg)
    for i in range(2):
        r = step(make_batch(seed=i), i)  # CPU batch: the step moves it
        assert not r.skipped_nonfinite and math.isfinite(r.loss)
    if model.bank is not None:
        assert model.bank.local.is_cuda and (model.bank.counts > 0).any()


def test_frozen_dense_trains_what_trelm_trains_plus_whole_ffns(dataset):
    from trelm_fast.optim import parameter_group

    _, model, step = setup_step("frozen_dense", dataset)
    _, trelm_model, _ = setup_step("trelm", dataset)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    trelm_trained = {n for n, p in trelm_model.named_parameters() if p.requires_grad}
    ffn = {n for n, _ in model.named_parameters() if parameter_group(n.removeprefix("mlm.")) == "ffn"}
    assert ffn and trelm_trained and trained == trelm_trained | ffn
    assert step.router is None and not hasattr(model.mlm.bert.encoder.layer[0], "trelm_ffn")
