"""train.cuda_graphs on a GPU: captured and replayed plain steps train as eager ones, without a host sync.

(On CPU tests/test_graphs.py rehearses the same step body; these need CUDA and are skipped without it.)
"""
import pytest
import torch

from test_graphs import SETTINGS, _compare, _same_shape_batches
from test_model import tiny_config


def _train_cuda(method, dataset, graphs, batches, sync_check_from=None):
    """As test_graphs._train, on CUDA in fp32 (no TF32); steps from ``sync_check_from`` on (plain steps
    whose graph is already captured) run under torch.cuda.set_sync_debug_mode("error"), counted."""
    from trelm_fast.step import build_step_model, make_step

    cfg = tiny_config(*SETTINGS, "routing.refresh=6", "train.precision=fp32", "train.tf32=false",
                      f"train.cuda_graphs={str(graphs).lower()}")
    torch.manual_seed(0)
    model = build_step_model(method, cfg, dataset, device="cuda")
    step = make_step(method, model, cfg)
    results, checked_steps = [], 0
    for i, b in enumerate(batches):
        checked = sync_check_from is not None and i >= sync_check_from and not step.refresh_due(i) \
            and step.graphs.entries and next(iter(step.graphs.entries.values())).graph is not None
        checked_steps += bool(checked)
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            result = step(b, i, epoch=0.25 * i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append(result)
    scalars = [r.scalars() for r in results]  # read after the steps: the host syncs are here
    bank = None if model.bank is None else model.bank.state_dict()
    return scalars, model.state_dict(), step.optimizer.state_dict(), bank, step.paths, step, checked_steps


@pytest.mark.cuda
@pytest.mark.parametrize("method,captures", [("trelm", 1), ("dense_opt", 1)])
def test_captured_steps_train_as_eager_steps_without_host_syncs(method, captures, dataset):
    # trelm: refreshes at 0 and 6 (eager; the second keeps the path sizes, so the graph survives it),
    # warm-up at 1-2, capture at 3, replays at 4-5 and 7-11; dense_opt: warm-up at 0-1, capture at 2,
    # replays at 3-11
    batches = _same_shape_batches(12)
    eager = _train_cuda(method, dataset, False, batches)
    graphed = _train_cuda(method, dataset, True, batches, sync_check_from=0)
    _compare(eager, graphed)
    assert graphed[5].graphs.captures == captures
    assert graphed[6] >= 4  # replayed steps checked for host syncs


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_plain_steps_copy_their_batch_from_page_locked_memory(graphs, dataset):
    # A copy from pageable memory waits for the stream (the CUDA runtime stages it), so the host could
    # not prepare a step while the GPU runs the previous one; set_sync_debug_mode does not see it.
    from torch.profiler import ProfilerActivity, profile

    from trelm_fast.step import build_step_model, make_step

    cfg = tiny_config(*SETTINGS, "routing.refresh=6", "train.precision=fp32",
                      f"train.cuda_graphs={str(graphs).lower()}")
    step = make_step("trelm", build_step_model("trelm", cfg, dataset, device="cuda"), cfg)
    batches = _same_shape_batches(6)
    for i in range(4):  # the refresh at 0; with graphs the warm-up at 1-2 and the capture at 3
        step(batches[i], i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in (4, 5):
            step(batches[i], i)
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "Memcpy HtoD" in e.name]
    assert copies, "no host-to-device copy was profiled"
    assert not [c for c in copies if "Pageable" in c]
