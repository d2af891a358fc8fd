"""CPU proxies of the GPU step's host cost (issue 12): host syncs and aten ops of a plain step.

On a GPU a host sync (`.item()`, `bool(t)`, `nonzero`, boolean-mask indexing, `torch.unique`, a
device->host copy) stalls the launch queue, and every aten op is at least one kernel launch. Both
show on the CPU: syncs as the aten ops that read a tensor's values on the host or size an output
from its values, plus the Python-level reads (`tolist`, `numpy`, `item`, `bool`, `float`, `int`,
`cpu`); launches as the ops a `TorchDispatchMode` sees. The step runs on a batch prepared the way
the loader's collate prepares it (`TrainStep.prepare`: index fields and negatives, host work that
does not count), without padding (transformers asks the device whether a 2-D attention mask is all
ones, which the step avoids by passing no mask when the batch has no padding).
"""
import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from test_model import make_batch, setup_step

SYNC_OPS = {  # aten ops that wait for the device: a value read on the host, or an output sized by values
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.nonzero_static",
    "aten.masked_select", "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
    "aten.unique_dim_consecutive",
}
HOST_READS = {"tolist", "numpy", "item", "__bool__", "__float__", "__int__", "__index__", "cpu"}


class _Counter(TorchDispatchMode):
    """Every aten op (overload packet name) and the sync-like uses of them."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        kwargs = kwargs or {}
        self.ops[name] += 1
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):  # boolean-mask indexing
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.ops["sync:boolean-mask index"] += 1
        if name == "aten.repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3:
            self.ops["sync:repeat_interleave without output_size"] += 1
        return func(*args, **kwargs)

    def syncs(self) -> dict:
        return {k: v for k, v in self.ops.items() if k in SYNC_OPS or k.startswith("sync:")}


class _HostReads(TorchFunctionMode):
    """Python-level reads of tensor values (not dispatched on CPU tensors, a device->host copy on CUDA)."""

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def _plain_step_counts(method, dataset, index=3):
    """(op counter, host reads) of step `index` (not a refresh step) of `method` after 3 warm-up steps."""
    cfg, model, step = setup_step(method, dataset, "routing.refresh=50")
    batch = make_batch(seed=0)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # no padding (see the docstring)
    batch = step.prepare(batch)
    for i in range(index):
        step(batch, i)
    counter, reads = _Counter(), _HostReads()
    with reads, counter:
        result = step(batch, index)
    assert not result.skipped_nonfinite
    return counter, reads


@pytest.mark.parametrize("method", ["trelm_fast", "dense_opt"])
def test_a_plain_step_makes_no_host_sync(method, dataset):
    counter, reads = _plain_step_counts(method, dataset)
    assert counter.syncs() == {}, f"{method}: host syncs in a plain step"
    assert dict(reads.reads) == {}, f"{method}: host reads of tensor values in a plain step"


def test_the_counters_see_the_syncs_they_look_for():
    counter, reads = _Counter(), _HostReads()
    x = torch.tensor([0.0, 1.0, -1.0])
    with reads, counter:
        x[x > 0].sum().item()
        x.nonzero()
        torch.unique(x)
        x.tolist()
        bool(x.any())
    assert set(counter.syncs()) >= {"aten._local_scalar_dense", "aten.nonzero", "aten._unique2",
                                    "sync:boolean-mask index"}
    assert {"item", "tolist", "__bool__"} <= set(reads.reads)


# Issue 12's target is at most 1.25 x dense_opt's ops (on the GPU every op is a launch); NOT reached.
# Measured here (2 layers, d 32, I 48, 3 x 17 tokens, fp32, dropout 0; kernels by their PyTorch
# references): 692 vs 354 ops (1.95x). On the benchmark's tiny shape (2 x 32 tokens, dropout 0.1)
# 840 vs 490 before issue 12's work, 785 vs 469 after (1.67x). Most of the rest: the slice-AdamW
# reference (about 30 ops per sliced tensor, 3 tensors per layer; one Triton launch each on a GPU),
# the bank update and the injection. Until the target is reached this guards against regressions.
OP_RATIO_GUARD = 2.0


def test_a_plain_trelm_step_has_few_more_ops_than_dense_opt(dataset):
    trelm = sum(_plain_step_counts("trelm_fast", dataset)[0].ops.values())
    dense = sum(_plain_step_counts("dense_opt", dataset)[0].ops.values())
    assert trelm <= OP_RATIO_GUARD * dense, f"trelm_fast {trelm} ops, dense_opt {dense}"

