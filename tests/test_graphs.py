"""train.cuda_graphs: the graphed plain step (`trelm_fast.graphs.GraphedStep`) trains as the eager one.

On CPU the graph's body is rehearsed: run eagerly on the static buffers, exactly the callable a CUDA
capture would record, so a value baked in at build time (a Python float, the first batch's host
values) shows here as a difference from the eager step. tests/test_cuda_graphs.py captures for real.
"""
import pytest
import torch

from test_model import make_batch, setup_step
from test_static_shapes import OpLog, _batches, assert_trained_alike
from test_step_sync import SYNC_OPS
from trelm_fast.config import ConfigError
from trelm_fast.graphs import GraphedStep

# a warm-up schedule (the lr changes every step), a refresh at step 3, clipping (the norm is an output)
SETTINGS = ("train.static_shapes=always", "routing.refresh=3", "schedule.warmup_steps=5", "train.max_grad_norm=1.0")


def _train(method, dataset, graphs, batches, *extra):
    """Losses and final state of steps 0..len-1 on ``batches``, the epoch changing every step."""
    cfg, model, step = setup_step(method, dataset, *SETTINGS, f"train.cuda_graphs={str(graphs).lower()}", *extra)
    results = [step(b, i, epoch=0.25 * i).scalars() for i, b in enumerate(batches)]
    bank = None if model.bank is None else model.bank.state_dict()
    return results, model.state_dict(), step.optimizer.state_dict(), bank, step.paths, step


def _compare(eager, graphed):
    assert_trained_alike(eager, graphed, rel=1e-5)  # the rate and lambda rounded on the device
    assert eager[2]["dense"]["param_groups"] == graphed[2]["dense"]["param_groups"]  # lr a float, as saved eagerly


def _same_shape_batches(count):
    """Batches of one signature and varying content: one batch's labels and spans, with other
    tokens wherever it has neither a label nor [CLS] (a step also draws other negatives)."""
    base = make_batch(seed=200, B=4, n=19)
    free = (base["mlm_labels"] == -100) & (base["cka_labels"] == -100)
    free[:, 0] = False
    out = []
    for i in range(count):
        other = torch.randint(1000, 3000, free.shape, generator=torch.Generator().manual_seed(i))
        out.append({**base, "input_ids": torch.where(free, other, base["input_ids"])})
    return out


@pytest.mark.parametrize("method,rule", [("trelm", "top_fraction"), ("trelm", "threshold"), ("dense", None),
                                         ("dense_opt", None)])
def test_rehearsed_graph_steps_train_as_eager_steps(method, rule, dataset):
    # trelm: steps 0, 3 and 6 refresh (eager), the others run bodies (one body at 1, 2, 4 and 7, on four
    # batches; a batch of another shape at 5, its own signature); dense methods: bodies at every step
    batches = _same_shape_batches(8)
    batches[5] = _batches(1)[0]
    extra = () if rule is None else (f"routing.rule={rule}",)
    eager, graphed = (_train(method, dataset, g, batches, *extra) for g in (False, True))
    _compare(eager, graphed)
    step = graphed[5]
    assert step.graphs is not None and eager[5].graphs is None
    assert len(step.graphs.entries) == 2
    assert step.graphs.captures == 0  # CPU: rehearsed, never captured
    # a body's runs since the last invalidation: a refresh keeping every path size (top_fraction) keeps
    # the graphs, one changing a size drops them all (threshold: here at steps 3 and 6, so the body of
    # step 5's shape has run 0 times since, the other one once, at 7)
    sizes = [m.sum(1).tolist() for m in step.router.history.masks] if step.router is not None else []
    runs = sorted(e.runs for e in step.graphs.entries.values())
    if rule == "top_fraction":
        assert sizes[0] == sizes[1] == sizes[2] and runs == [1, 4]
    elif rule == "threshold":
        assert sizes[0] != sizes[1] != sizes[2] and runs == [0, 1]
    else:
        assert runs == [1, 7]


def test_rehearsed_graph_steps_keep_the_slices_own_rate(dataset):
    """optim.slice_lr_scale != 1: the slices read a second rate tensor, refilled whenever the
    schedule changes the rate (every step here), and train as the eager step's float rate does."""
    batches = _same_shape_batches(5)
    eager, graphed = (_train("trelm", dataset, g, batches, "optim.slice_lr_scale=2.5") for g in (False, True))
    _compare(eager, graphed)
    opt = graphed[5].optimizer
    assert opt.slice_lr_tensor is not opt.lr_tensor
    assert opt.slice_lr_tensor.item() == pytest.approx(2.5 * opt.lr_tensor.item())


def _constants(flat) -> list:
    """The number and dtype arguments of an op (what a captured graph keeps as they were)."""
    return [a for a in flat if isinstance(a, (bool, int, float, torch.dtype))]


@pytest.mark.parametrize("method", ["trelm", "dense"])
def test_a_graph_body_bakes_in_nothing_that_changes(method, dataset, monkeypatch):
    """Each run of one signature's body must launch the same ops with the same constants while the
    learning rate, the epoch and the batch change (a capture would freeze the first run's), and no
    op that reads a value on the host."""
    runs_per_body = []
    build = GraphedStep._entry

    def recorded_entry(self, batch):
        entry, runs = build(self, batch), []
        body = entry.body

        def run():
            with OpLog(_constants) as ops:
                out = body()
            runs.append(ops.calls)
            return out
        entry.body = run
        runs_per_body.append(runs)
        return entry

    monkeypatch.setattr(GraphedStep, "_entry", recorded_entry)
    cfg, model, step = setup_step(method, dataset, *SETTINGS, "train.cuda_graphs=true", "routing.refresh=100")
    for i, b in enumerate(_same_shape_batches(7)):
        step(b, i, epoch=0.25 * i)
    assert max(len(r) for r in runs_per_body) >= 4
    for runs in runs_per_body:  # a first run may create the optimizer state: what the warm-up is for
        for later in runs[2:]:
            assert later == runs[1]
        host_reads = [op for run in runs for op, _ in run if op in SYNC_OPS]
        assert host_reads == []


@pytest.mark.parametrize("override,message", [
    (("train.static_shapes=never",), "needs static shapes"),
    (("train.static_shapes=auto",), "is off on cpu"),
    (("train.static_shapes=always", "train.precision=fp16"), "fp16"),
    (("train.static_shapes=always", "train.grad_accum_steps=2"), "gradient accumulation"),
])
def test_cuda_graphs_settings_are_checked(dataset, override, message):
    with pytest.raises(ConfigError, match=message):
        setup_step("trelm", dataset, "train.cuda_graphs=true", *override)


def test_cuda_graphs_refuse_the_naive_routing(dataset):
    with pytest.raises(ConfigError, match="trelm_naive"):
        setup_step("trelm_naive", dataset, "train.cuda_graphs=true", "train.static_shapes=always")
