"""CPU proxies of a knowledge-path refresh's host cost (issue 12), beside tests/test_step_sync.py's
for a plain step: the aten ops (on a GPU, kernel launches) and the host syncs of the router's
refresh (attribution, selection, the paths' host copy and statistics) inside a trainer step at a
refresh index, counted with that module's counters and the GPU's dispatch (`launches`: Triton
kernels as one counted launch each).

`routing.max_copies=1000` lets one pass carry every copy, as the GPU's memory rule does at this size.
Before the cross-layer batching and the sync removal (commit 49b0f19), on this tiny shape (3 x 17
tokens, d 32, I 48, m = 3): 446 / 1151 / 2196 ops with 2 / 4 / 6 layers (the layers above each
attributed layer ran once per layer: ~L^2 / 2 layer passes), 9 / 11 / 13 host syncs and 15 / 27 /
39 host reads; after: 366 / 681 / 989 ops, 2 syncs and 4 reads at every depth.
"""
import pytest
import torch

from test_model import make_batch, setup_step
from test_step_sync import _Counter, _HostReads, _kernels


def _refresh_counts(dataset, monkeypatch, layers: int):
    """(op counter, host reads) of the router's refresh in step 50 (R = 50) after 3 warm-up steps."""
    _, _, step = setup_step("trelm_fast", dataset, "routing.refresh=50", f"model.num_layers={layers}",
                            "routing.max_copies=1000")
    batch = step.prepare(make_batch(seed=0))  # its last row is padded
    for i in range(3):
        step(batch, i)
    counter, reads = _Counter(), _HostReads()
    refresh = step.router.refresh

    def counted(*args, **kwargs):
        with _kernels("launches", monkeypatch, lambda: counter), reads, counter:
            return refresh(*args, **kwargs)

    monkeypatch.setattr(step.router, "refresh", counted)
    stats = step(batch, 50).stats
    assert "routing/jaccard_mean" in stats and counter.ops["launch:_attribution_kernel"] == layers  # it ran
    return counter, reads


# The host syncs left in a refresh, each documented in docs/routing.md: transformers' all-ones check
# of the padded attention mask (prefix context), and P's mean read for the log; the host reads add the
# target layout (per-sequence target counts: the copies' shapes) and the paths' one host copy.
REFRESH_SYNCS = 2
REFRESH_HOST_READS = 4


@pytest.mark.parametrize("layers", [2, 4])
def test_a_refresh_reads_the_device_a_few_times_whatever_the_depth(layers, dataset, monkeypatch):
    counter, reads = _refresh_counts(dataset, monkeypatch, layers)
    syncs = counter.syncs()
    assert "aten.nonzero" not in syncs and "sync:boolean-mask index" not in syncs, syncs
    assert sum(syncs.values()) <= REFRESH_SYNCS, syncs
    assert sum(reads.reads.values()) <= REFRESH_HOST_READS, dict(reads.reads)


# One pass up the stack for all attributed layers: ops grow linearly with the depth (before: by
# 705 from 2 to 4 layers, then by 1045 from 4 to 6; now by 315 and 308) at under 200 ops per layer.
OPS_PER_LAYER = 200


def test_a_refresh_runs_the_stack_once_for_all_layers(dataset, monkeypatch):
    ops = {L: sum(_refresh_counts(dataset, monkeypatch, L)[0].ops.values()) for L in (2, 4, 6)}
    assert ops[6] - ops[4] <= 1.1 * (ops[4] - ops[2]), ops
    assert (ops[6] - ops[2]) / 4 <= OPS_PER_LAYER, ops
