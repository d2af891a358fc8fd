"""CUDA graphs of the plain training step (`train.cuda_graphs`; docs/training.md, "CUDA graphs").

A plain step (no path refresh) with static shapes (`train.static_shapes`) launches the same kernels
on tensors of the same shapes every time, only their contents change: the recipe of PyTorch's
"whole-network capture" (https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture).
`GraphedStep` keeps, per shape signature of the batch (`signature`):

- static device buffers, one per tensor field of the batch, into which each step's batch is copied
  (`copy_(..., non_blocking=True)`, from page-locked host memory: `trelm_fast.step.page_locked`);
- the step body, built once per signature: zero the gradients (set to None, so the captured backward
  writes them afresh on every replay), forward + loss + backward (`TrainStep.accumulate`), clip and
  optimizer step (`TrainStep.finish`), memory-bank update (`TrainStep.fold_into_bank`); it returns one
  tensor [total, mlm, cka, skipped(, grad norm)]. What changes per step is read on the device: the
  learning rate (`TrelmOptimizer.lr_tensor`) and the epoch (`epoch`, a float64 0-dim tensor, for the
  bank's lambda(epoch)), both updated in place before the body runs;
- on CUDA a `torch.cuda.CUDAGraph`: the first `warmup` steps of a signature run the body eagerly on a
  side stream (Triton autotuning, lazy optimizer state, cuBLAS workspaces), the next one captures it
  and replays it, every later one only replays it.

On another device the body runs eagerly on the static buffers ("rehearsal"): the very callable that
would be captured, so the CPU tests catch a value baked in at capture time (a Python float read by
the body, a host value of the first batch of a signature).

Refresh steps stay eager (`TrainStep.step`). A refresh whose paths have the sizes of the old ones
(every refresh under the default rule `top_fraction`) copies them into the layers' path buffers in
place and keeps the slice leaves (`TrelmFFN.set_path`), so the graphs survive it and the next plain
step replays. A path of another size (rules `threshold`, `global_budget`) gets a new buffer and new
leaves, which a captured graph would not see, so `TrainStep._apply_paths` then calls `invalidate`:
every graph is dropped (the buffers stay) and each signature warms up and is captured again, as
after `TrainStep.load_state_dict`. (That graphs survive a refresh is checked by rehearsal on CPU,
tests/test_graphs.py, and by capture on a GPU, tests/test_cuda_graphs.py.) At most `max_graphs`
signatures are kept (the least recently used one is dropped).

Host values of a batch that the body reads must be the same for every batch of a signature:
`signature` holds them (`mlm_count > 0`: `dense`'s objective branches on it); `entity_rounds` (the loop
count of the bank's CPU reference) is replaced by its bound, the number of (padded) entity spans.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from trelm_fast.step import page_locked


def signature(batch: dict) -> tuple:
    """What a graph is specific to: (name, shape, dtype) of every tensor field of the prepared,
    padded ``batch``, and whether it has labelled positions."""
    fields = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()) if isinstance(v, Tensor))
    return fields + (batch["mlm_count"] > 0,)


@dataclass
class _Entry:
    """One signature: its static batch (device buffers and host values), body, graph and output."""
    batch: dict
    body: Callable[[], Tensor]
    runs: int = 0  # eager runs since the last invalidation
    graph: Optional["torch.cuda.CUDAGraph"] = None
    out: Optional[Tensor] = None  # the captured body's output (overwritten by every replay)


class GraphedStep:
    """The plain steps of a `TrainStep` as CUDA-graph replays (module docstring).

    ``run(batch, epoch)`` -> Tensor [total, mlm, cka, skipped(, grad norm)] (a fresh copy): one plain
    step on ``batch`` (prepared and padded, on the host or the device), at the learning rate already
    set on the optimizer. ``capture``: capture graphs (default: on CUDA), else rehearse.
    """

    def __init__(self, step, warmup: int = 2, max_graphs: int = 8, capture: Optional[bool] = None):
        self.step, self.warmup, self.max_graphs = step, warmup, max_graphs
        self.device = step.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.epoch = torch.zeros((), dtype=torch.float64, device=self.device)
        self.stream = torch.cuda.Stream(self.device) if self.capture else None  # warm-up and capture run on it
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)

    def invalidate(self) -> None:
        """Drop every captured graph (after paths of another size or loaded state: the graphs point
        at old tensors)."""
        for e in self.entries.values():
            e.graph, e.out, e.runs = None, None, 0

    def run(self, batch: dict, epoch: float) -> Tensor:
        key = signature(batch)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._entry(batch)
            if len(self.entries) > self.max_graphs:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        for k, buf in entry.batch.items():
            if isinstance(buf, Tensor):
                buf.copy_(page_locked(batch[k], buf.device), non_blocking=True)
        self.epoch.fill_(epoch)
        if entry.graph is None and (not self.capture or entry.runs < self.warmup):
            entry.runs += 1
            return self._eager(entry).clone()
        if entry.graph is None:
            self._capture(entry)
        entry.graph.replay()
        return entry.out.clone()

    def _entry(self, batch: dict) -> _Entry:
        """Static buffers for ``batch``'s signature and the body that steps on them."""
        static = {k: (torch.empty_like(v, device=self.device) if isinstance(v, Tensor) else v)
                  for k, v in batch.items()}
        static["entity_rounds"] = static["entity_spans"].shape[0]  # a bound on every batch's rounds
        step, epoch = self.step, self.epoch

        def body() -> Tensor:
            step.optimizer.zero_grad()  # None: the (captured) backward writes the gradients afresh
            micro = step.accumulate(static, epoch)
            _, norm, _ = step.finish(micro.nonfinite)
            step.fold_into_bank([micro], micro.nonfinite)
            parts = [micro.total, micro.mlm, micro.cka, micro.nonfinite] + ([norm] if norm is not None else [])
            return torch.stack([t.float() for t in parts])

        return _Entry(static, body)

    def _eager(self, entry: _Entry) -> Tensor:
        """The body run eagerly: on CUDA on the side stream the capture will use (the recipe's warm-up)."""
        if not self.capture:
            return entry.body()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = entry.body()
        current.wait_stream(self.stream)
        out.record_stream(current)  # read there next (the copy): not reused by the side stream before
        return out

    def _capture(self, entry: _Entry) -> None:
        """Capture the body (torch.cuda.graph synchronizes first; nothing runs until the replay)."""
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph, stream=self.stream):
            entry.out = entry.body()
        self.captures += 1
