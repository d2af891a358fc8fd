"""train.static_shapes: padded batches train exactly as unpadded ones, with few distinct shapes.

`trelm_fast.data.prepare.pad_static` pads every content-dependent index field to a power of two;
the padding rows must change nothing (losses, parameters, optimizer state, memory bank), and a plain
step must then see a small fixed set of shape signatures where without it nearly every batch is new.
"""
import collections
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from test_model import make_batch, setup_step
from test_step_sync import _kernels
from trelm_fast.config import ConfigError, load_config, static_shapes_on
from trelm_fast.data.prepare import pad_static, prepare_batch
from trelm_fast.kernels import kernel_backend
from trelm_fast.kernels.kmb_update import kmb_update
from trelm_fast.memory_bank import KnowledgeMemoryBank


def _batches(count, first_seed=0):
    """Random batches of odd, varying sizes; every other one without padding."""
    out = []
    for i in range(count):
        b = make_batch(seed=first_seed + i, B=3 + i % 2, n=17 + 2 * (i % 3))
        if i % 2:
            b["attention_mask"] = torch.ones_like(b["attention_mask"])
        out.append(b)
    return out


def _tensors(obj):
    """Flat list of the tensors in a nested state dict (in a fixed order)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _train(method, dataset, static, batches):
    cfg, model, step = setup_step(method, dataset, f"train.static_shapes={static}", "routing.refresh=3")
    losses = [step(b, i).scalars() for i, b in enumerate(batches)]
    bank = None if model.bank is None else model.bank.state_dict()
    return losses, model.state_dict(), step.optimizer.state_dict(), bank, step.paths


def assert_trained_alike(off, on, rel=1e-6):
    """Two runs' (per-step `StepResult.scalars`, model state, optimizer state, bank state, paths)
    agree: the scalars to ``rel``, the states to 1e-5 (fp32 sums in another order), the paths exactly."""
    for a, b in zip(off[0], on[0]):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), key
    for k in off[1]:
        torch.testing.assert_close(on[1][k], off[1][k], rtol=1e-5, atol=1e-5, msg=k)
    opt_off, opt_on = _tensors(off[2]), _tensors(on[2])
    assert len(opt_off) == len(opt_on) > 0
    for a, b in zip(opt_off, opt_on):  # moments and step counts
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if off[3] is not None:
        for key in ("local", "global_mean", "counts"):
            torch.testing.assert_close(on[3][key], off[3][key], rtol=1e-5, atol=1e-6)
    if off[4] is not None:
        assert all(torch.equal(a, b) for a, b in zip(off[4], on[4]))


@pytest.mark.parametrize("method", ["trelm", "dense", "dense_opt"])
def test_padded_batches_train_as_unpadded_ones(method, dataset):
    batches = _batches(4)  # step 3 refreshes the paths on a padded batch
    assert_trained_alike(*(_train(method, dataset, s, batches) for s in ("never", "always")))


def test_padding_fields_and_weights():
    batch = prepare_batch(make_batch(seed=3))
    padded = pad_static(batch)
    n_mlm, n_cka = batch["mlm_count"], batch["cka_count"]
    for kind, real in (("mlm", n_mlm), ("cka", n_cka)):
        rows = padded[f"{kind}_targets"].shape[0]
        assert rows >= real and rows & (rows - 1) == 0
        assert padded[f"{kind}_weight"].tolist() == [pytest.approx(1.0 / real)] * real + [0.0] * (rows - real)
        assert torch.equal(padded[f"{kind}_positions"][:real], batch[f"{kind}_positions"])
    e = batch["entity_spans"].shape[0]
    assert padded["entity_spans"][e:].eq(0).all() and not padded["entity_first"][e:].any()
    p = batch["target_positions"].shape[1]
    assert padded["target_positions"][1, p:].eq(batch["input_ids"].shape[0]).all()  # the scratch row B
    assert pad_static(padded) is padded


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_bank_folds_nothing_from_empty_spans(backend):
    """`KnowledgeMemoryBank.apply` with padding spans (0, 0, 0, 0) after the real ones: the same bank."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8)
    spans = torch.tensor([[0, 1, 3, 2], [1, 2, 4, 0], [0, 5, 6, 2]])
    batch = prepare_batch({"input_ids": torch.zeros(2, 9, dtype=torch.long),
                           "attention_mask": torch.ones(2, 9, dtype=torch.long),
                           "mlm_labels": torch.full((2, 9), -100), "cka_labels": torch.full((2, 9), -100),
                           "entity_spans": spans, "target_spans": torch.zeros(0, 4, dtype=torch.long),
                           "target_triples": torch.zeros(0, 2, dtype=torch.long)})
    padded = pad_static(batch)
    assert padded["entity_spans"].shape[0] == 4
    banks = []
    for b in (batch, padded):
        bank = KnowledgeMemoryBank(8, window=1, capacity=4)
        bank.add_entities(torch.arange(4), torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))
        with kernel_backend(backend):
            bank.apply(hidden, b["entity_spans"], b["lengths"], b["entity_first"], b["entity_rounds"],
                       padded=bool(b.get("static_shapes")))
        banks.append(bank.state_dict())
    for key in ("local", "global_mean", "counts"):
        torch.testing.assert_close(banks[1][key], banks[0][key], rtol=0, atol=0)
    assert banks[0]["counts"][0] == 1  # entity 0 (the padding's id) was updated once, by its real span


class OpLog(TorchDispatchMode):
    """``calls``: (op name, ``describe(flat arguments)``) of every op run inside it, in order."""

    def __init__(self, describe):
        super().__init__()
        self.describe, self.calls = describe, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((str(func.overloadpacket), self.describe(tree_leaves((args, kwargs)))))
        return func(*args, **kwargs)


def _shapes(flat) -> tuple:
    """The shapes of the tensor arguments (a step's shape signature is these of every op)."""
    return tuple(tuple(t.shape) for t in flat if isinstance(t, torch.Tensor))


def _signatures(method, dataset, static, monkeypatch, count=24):
    """(distinct shape signatures of `count` plain steps (GPU dispatch, kernels as stubs) on batches
    of one (B, n) and varying content, distinct tuples of the batches' index-field lengths)."""
    cfg, model, step = setup_step(method, dataset, f"train.static_shapes={static}", "routing.refresh=1000")
    batches = [step.prepare(make_batch(seed=100 + i)) for i in range(count + 1)]
    step(batches[0], 0)  # the refresh
    seen, launches = collections.Counter(), types.SimpleNamespace(ops=collections.Counter())
    for i, b in enumerate(batches[1:], start=1):
        shapes = OpLog(_shapes)
        with _kernels("launches", monkeypatch, lambda: launches), shapes:
            step(b, i)
        seen[tuple(shapes.calls)] += 1
    lengths = {tuple(b[k].shape[-1 if k == "target_positions" else 0] for k in VARYING) for b in batches[1:]}
    return len(seen), len(lengths)


VARYING = ("mlm_targets", "cka_targets", "target_spans", "target_positions", "entity_spans")

# Measured (24 batches of 3 x 17 tokens, whose counts straddle 8): with static shapes 7 signatures
# for trelm_fast (one per combination of the buckets of its five varying lengths), 2 for dense_opt
# (labelled positions only); without, 24 and 11 (nearly every batch a new graph).
MAX_STATIC_SIGNATURES = 8


@pytest.mark.parametrize("method", ["trelm_fast", "dense_opt"])
def test_a_static_step_sees_few_shape_signatures(method, dataset, monkeypatch):
    on, buckets = _signatures(method, dataset, "always", monkeypatch)
    off, _ = _signatures(method, dataset, "never", monkeypatch)
    assert on <= buckets, f"{method}: {on} signatures for {buckets} bucket combinations: something else varies"
    assert on <= MAX_STATIC_SIGNATURES, f"{method}: {on} distinct shape signatures with static shapes"
    assert off > MAX_STATIC_SIGNATURES, f"{method}: only {off} signatures without: the check would not see a change"


def test_the_setting_is_validated_and_auto_means_cuda():
    assert load_config(None, ["train.static_shapes=always"]).train.static_shapes == "always"
    with pytest.raises(ConfigError, match="train.static_shapes must be one of never, always, auto"):
        load_config(None, ["train.static_shapes=sometimes"])
    with pytest.raises(ConfigError, match="train.static_shapes must be str, got True .YAML reads on/off"):
        load_config(None, ["train.static_shapes=on"])  # YAML reads on/off as booleans
    assert static_shapes_on("auto", "cuda:0") and static_shapes_on("auto", torch.device("cuda"))
    assert not static_shapes_on("auto", "cpu") and not static_shapes_on("never", "cuda")
    assert static_shapes_on("always", torch.device("cpu"))
