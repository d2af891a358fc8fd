"""One training step as an object: what `train.py` drives and `benchmarks/run.py` times.

    step = make_step("trelm", model, cfg)          # model: a TrelmModel (see `build_step_model`)
    result = step(batch, step_index, epoch=0.0)    # StepResult(loss, mlm_loss, cka_loss, ...)

Methods (paper table 6 and DESIGN.md section 3):

| method        | injection | bank | routing       | objective                                   | trained                     |
|---------------|-----------|------|---------------|---------------------------------------------|-----------------------------|
| `trelm`       | yes       | yes  | fused, every R| MLM at labelled positions + CKA (eq. 3)     | path slices + `method.trainable` groups (default: embeddings, MLM head, knowledge projection) |
| `trelm_fast`  | = `trelm` (the benchmark name)                                                                          |
| `no_injection`| no        | yes  | fused         | as `trelm`                                  | as `trelm`                  |
| `no_kmb`      | yes       | no   | fused         | as `trelm`                                  | as `trelm`                  |
| `no_routing`  | yes       | yes  | none          | as `trelm`                                  | every parameter (AdamW)     |
| `frozen_dense`| yes       | yes  | none          | as `trelm`                                  | `method.trainable` groups + every FFN whole (W1, b1, W2; AdamW): `trelm` without routing and sparse gradients |
| `dense`       | yes       | yes  | none          | stock HF full-vocabulary MLM at all positions + CKA | every parameter (AdamW) |
| `trelm_naive` | yes       | yes  | per-layer KN loop | as `trelm`, dense FFN gradients then masked to the paths | as `trelm` (AdamW on masked gradients) |
| `hf_dense`    | no        | no   | none          | stock `BertForMaskedLM(labels=...)` MLM     | every parameter (AdamW)     |
| `dense_opt`   | no        | no   | none          | MLM logits only at labelled positions       | every parameter (AdamW)     |

Decoders (GPT-2, Llama; `TrelmModel.causal`) run every method with the causal LM in place of the
MLM: unmasked inputs, each label read at the state one position earlier (the batch's
`label_shift`, `trelm_fast.data.prepare`), the rest as above (docs/models.md "Decoders in the trainer").

Every method gets the same generic engineering (precision, fused AdamW, no host sync in a plain
step), so the step benchmark's ratios measure the method: to `dense_opt` TRELM as a whole, to
`frozen_dense` routing plus sparse FFN gradients alone.

A step (`step` runs the phases `begin`, `accumulate` per micro-batch, `finish`, `update_bank`;
`trelm_fast.hf.TrelmTrainer` runs them inside the transformers Trainer loop): on the host, the
batch's index fields (`trelm_fast.data.prepare`, normally done by the loader's collate) and the CKA
negatives (`cka_negatives`, sampled from Q with the step's generator unless the batch has them);
move the batch to the model's device; refresh knowledge paths when due (on the first micro-batch);
for each micro-batch (one, or `train.grad_accum_steps`) forward, loss weighted by the
micro-batch's share of the step's labelled positions and CKA targets, backward; under
torch.distributed average dense gradients (explicit all-reduce) and path slices
(`allreduce_slice_grads`); clip their global norm (`train.max_grad_norm`); optimizer step at the
scheduled learning rate; memory-bank update from each micro-batch's final hidden states (after
the update, no gradient).

No host synchronization in a step without refresh (fp32/bf16; tests/test_step_sync.py counts):
counts come from index shapes, bank rows are entity ids, and a non-finite loss (on any rank) is
handled on the device: the optimizer and the bank update read a `skip` flag and change nothing
(gradients are dropped as usual). `StepResult` holds device tensors; the host learns about skipped
steps when it asks: `step.nonfinite_events()` (what `train.py` calls at logging steps) or
`step.nonfinite_total`. Under fp16 the loss scaler reads its overflow flag on the host anyway, so a
non-finite loss is checked there on the host and the step returns before the update.

Precision (`train.precision`, trelm_fast/precision.py): the forward and loss run under
torch.autocast for bf16/fp16, the backward outside it; fp16 scales the loss and its scaler may skip
the optimizer update after a gradient overflow (an expected event, reported as `amp/*` stats, not
a non-finite loss; the bank update still runs, its input was finite). The attribution runs under
bf16 autocast when the precision is bf16, in fp32 otherwise. The bank keeps its own storage dtype
(`kmb.dtype`) whatever dtype the final hidden states have.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from trelm_fast.config import Config, ConfigError, check_cuda_graphs, static_shapes_on
from trelm_fast.data.prepare import is_prepared, pad_rows, pad_static, prepare_batch
from trelm_fast.distributed import is_distributed
from trelm_fast.losses import NegativeSampler, cka_loss_at, mlm_loss_at, trelm_loss_at
from trelm_fast.model import TrelmModel, build_model
from trelm_fast.precision import MixedPrecision, autocast, set_tf32


@dataclass(frozen=True)
class MethodSpec:
    """What a method switches on: see the table in the module docstring."""
    inject: bool
    bank: bool
    routing: Optional[str]  # None, "fused" or "naive"
    objective: str  # "trelm", "hf_full_cka", "hf_stock", "labelled_mlm"
    trains: str = "all"  # "all" groups, or "method" (`method.trainable`), or "method+ffn" (plus whole FFNs)

METHOD_SPECS = {
    "trelm": MethodSpec(True, True, "fused", "trelm", "method"),
    "trelm_fast": MethodSpec(True, True, "fused", "trelm", "method"),
    "no_injection": MethodSpec(False, True, "fused", "trelm", "method"),
    "no_kmb": MethodSpec(True, False, "fused", "trelm", "method"),
    "no_routing": MethodSpec(True, True, None, "trelm"),
    "frozen_dense": MethodSpec(True, True, None, "trelm", "method+ffn"),
    "dense": MethodSpec(True, True, None, "hf_full_cka"),
    "trelm_naive": MethodSpec(True, True, "naive", "trelm", "method+ffn"),
    "hf_dense": MethodSpec(False, False, None, "hf_stock"),
    "dense_opt": MethodSpec(False, False, None, "labelled_mlm"),
}


def method_spec(method: str) -> MethodSpec:
    if method not in METHOD_SPECS:
        raise ValueError(f"method.name: unknown method {method!r} (known: {', '.join(METHOD_SPECS)})")
    return METHOD_SPECS[method]


def build_step_model(method: str, cfg: Config, dataset_dir, device="cpu") -> TrelmModel:
    """The TrelmModel a method needs, on ``device`` (memory bank included; ``.to()`` does not move
    the bank): FFNs swapped only where knowledge paths use the sparse backward."""
    spec = method_spec(method)
    return build_model(cfg, dataset_dir, inject=spec.inject, use_bank=spec.bank,
                       swap=spec.routing == "fused", device=device)


@dataclass
class StepResult:
    """Losses as detached 0-dim tensors on the step's device (total = theta * MLM + (1 - theta) * CKA,
    or the method's own; cka_loss is 0 for the methods without CKA), ``skipped_nonfinite``, a 0-dim
    bool tensor, and ``grad_norm``, the gradient norm before clipping (a 0-dim tensor when
    ``train.max_grad_norm`` > 0, else None). Reading any of them is a host sync: do it at logging
    steps (`scalars`).

    stats (host values only): ``lr``, ``tokens`` (real tokens), ``cka_targets`` (CKA positions),
    seconds spent in ``time/{forward_backward,optimizer,bank,step}_s`` (host time: on CUDA the
    launches, not the kernels); on refresh steps ``time/attribution_s`` and the router's
    ``routing/*`` path statistics; with a bank ``kmb/lambda``; under fp16 the loss scale
    ``amp/scale`` and whether the scaler skipped the update, ``amp/skipped`` (this step) and
    ``amp/skipped_total``.
    """
    loss: Tensor
    mlm_loss: Tensor
    cka_loss: Tensor
    skipped_nonfinite: Tensor
    stats: dict = field(default_factory=dict)
    grad_norm: Optional[Tensor] = None

    def scalars(self) -> dict:
        """{"loss", "mlm_loss", "cka_loss": float, "skipped_nonfinite": bool, and "grad_norm": float when
        clipping}, read in one host sync."""
        parts = [self.loss, self.mlm_loss, self.cka_loss, self.skipped_nonfinite]
        if self.grad_norm is not None:
            parts.append(self.grad_norm)
        values = torch.stack([t.float() for t in parts]).tolist()
        out = {"loss": values[0], "mlm_loss": values[1], "cka_loss": values[2], "skipped_nonfinite": values[3] > 0}
        if self.grad_norm is not None:
            out["grad_norm"] = values[4]
        return out


def item_counts(batch: dict) -> tuple[int, int]:
    """(labelled MLM positions, CKA targets) of a prepared batch (host values; the real ones, not
    the padding of static shapes)."""
    return batch["mlm_count"], batch["cka_count"]


def item_share(counts: tuple[int, int], totals: tuple[int, int]) -> tuple[float, float]:
    """One micro-batch's share of the step's labelled positions and of its CKA targets
    (`item_counts` over the step's ``totals``), 0 where the step has none. Losses that are means over
    a micro-batch's items, weighted by these, sum to the mean over the step's items."""
    return counts[0] / max(1, totals[0]), counts[1] / max(1, totals[1])


def share_of_items(counts: list[tuple[int, int]]) -> list[tuple[float, float]]:
    """`item_share` of each of a step's micro-batches, from their `item_counts`."""
    totals = (sum(c[0] for c in counts), sum(c[1] for c in counts))
    return [item_share(c, totals) for c in counts]


@dataclass
class MicroBatch:
    """One micro-batch's weighted losses and non-finite flag (detached tensors) and what the bank
    update needs of it: the final hidden states (or None) and the batch on the device."""
    total: Tensor
    mlm: Tensor
    cka: Tensor
    nonfinite: Tensor
    hidden: Optional[Tensor]
    batch: dict


def _sum(tensors: list[Tensor]) -> Tensor:
    """The sum of ``tensors`` (the tensor itself for one: no op)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).sum(0)


def lr_at(cfg: Config, step_index: int) -> float:
    """Scheduled learning rate at ``step_index`` (0-based): linear warm-up then constant/linear/cosine."""
    s, base = cfg.schedule, cfg.optim.lr
    if step_index < s.warmup_steps:
        return base * (step_index + 1) / s.warmup_steps
    if s.kind == "constant":
        return base
    span = max(1, cfg.train.steps - s.warmup_steps)
    progress = min(1.0, (step_index - s.warmup_steps) / span)
    decay = 1.0 - progress if s.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * (s.min_lr_ratio + (1.0 - s.min_lr_ratio) * decay)


def _allreduce_mean(tensors: list[Tensor]) -> None:
    """Average ``tensors`` in place across ranks (one flat all-reduce per dtype)."""
    if not tensors or not is_distributed():
        return
    world = dist.get_world_size()
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def _any_rank(flag: bool, device) -> bool:
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def any_rank_flag(flag: Tensor) -> Tensor:
    """A bool scalar tensor: ``flag`` on any rank (an all-reduce, no host sync)."""
    if not is_distributed():
        return flag
    t = flag.float()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t > 0


def page_locked(t: Tensor, device) -> Tensor:
    """``t``, in page-locked host memory when it is a CPU tensor bound for a CUDA ``device``.

    An asynchronous host-to-device copy from pageable memory is staged by the CUDA runtime, which
    first waits for the stream: the host would stop at every step's batch copy until the previous
    step's kernels finish, and prepare the next step while the GPU idles. From page-locked memory the
    copy is queued and the host goes on (PyTorch's pinned-memory allocator keeps the block until the
    copy is done)."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu" or t.is_pinned():
        return t
    return t.pin_memory()


def move_batch(batch: dict, device) -> dict:
    """Tensors of ``batch`` on ``device`` (asynchronous copies, from page-locked memory for CUDA:
    `page_locked`; tensors already there untouched)."""
    return {k: (page_locked(v, device).to(device, non_blocking=True) if isinstance(v, Tensor) and v.device != device
                else v)
            for k, v in batch.items()}


class TrainStep:
    """One training step of ``method`` on a TrelmModel; see the module docstring.

    ``step(batch, step_index, epoch)`` runs it; ``state_dict()/load_state_dict()`` cover what the
    step owns: optimizer state, loss-scaler state, knowledge paths, step counters and the
    negative-sampling generator. Construction applies ``train.tf32`` (process-wide, CUDA only).
    """

    def __init__(self, method: str, model: TrelmModel, cfg: Config):
        self.method, self.spec, self.model, self.cfg = method, method_spec(method), model, cfg
        if self.spec.inject != model.inject:
            raise ValueError(f"method {method} needs a model built with inject={self.spec.inject} "
                             "(use build_step_model)")
        if self.spec.bank != (model.bank is not None):
            raise ValueError(f"method {method} needs a model {'with' if self.spec.bank else 'without'} "
                             "a memory bank (use build_step_model)")
        self.head = model.head
        self.device = next(model.parameters()).device
        self.static_shapes = static_shapes_on(cfg.train.static_shapes, self.device)
        self.precision = MixedPrecision(cfg.train.precision, self.device)
        set_tf32(self.device, cfg.train.tf32)
        rank = dist.get_rank() if is_distributed() else 0
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17 + rank)
        self.negatives = NegativeSampler(model.negative_q)  # draws on the host, from Q's cumulative sums
        self.steps_done = 0
        self._nonfinite_read = 0  # skipped steps the host has counted
        self._pending: list[tuple[int, Tensor, Tensor]] = []  # (step index, skipped flag, loss) not read yet
        self.paths: Optional[list[Tensor]] = None  # one sorted index tensor per routed layer
        self.router = None
        if self.spec.routing is not None:
            from trelm_fast.routing import KnowledgeRouter

            self.router = KnowledgeRouter.from_config(model.mlm, cfg.routing,
                                                      autocast=self.precision.attribution_dtype)
        self._setup_parameters()
        self.graphs = None  # plain steps as CUDA-graph replays (train.cuda_graphs, trelm_fast.graphs)
        if cfg.train.cuda_graphs:
            from trelm_fast.graphs import GraphedStep

            check_cuda_graphs(cfg, "train.cuda_graphs", self.device, method)
            if is_distributed():
                raise ConfigError("train.cuda_graphs does not support torch.distributed yet (the gradient "
                                  "all-reduce and the bank's gather are outside the graph): run one process")
            self.graphs = GraphedStep(self)

    # ------------------------------------------------------------------------- set-up

    def _setup_parameters(self) -> None:
        """requires_grad flags and the optimizer of the method.

        `MethodSpec.trains`: "method", the `method.trainable` groups (trelm_fast.optim), plus the path
        slices of fused routing; "method+ffn" adds the whole FFN weights (`trelm_naive` masks their
        gradients to the paths, `frozen_dense` does not); "all", every group. The knowledge
        projection counts as group "other".
        """
        from trelm_fast.optim import DENSE_TRAINABLE, TrelmOptimizer, configure_trainable

        model, spec, o = self.model, self.spec, self.cfg.optim
        trainable = set(DENSE_TRAINABLE) if spec.trains == "all" else set(self.cfg.method.trainable)
        if spec.trains == "method+ffn":
            trainable.add("ffn")
        configure_trainable(model.mlm, trainable)
        model.injection.requires_grad_(spec.inject and "other" in trainable)
        modules = [model.mlm, model.injection]
        self.dense_params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.optimizer = TrelmOptimizer(modules, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                        weight_decay=o.weight_decay, device_lr=self.cfg.train.cuda_graphs,
                                        slice_lr_scale=o.slice_lr_scale)

    # ------------------------------------------------------------------------- routing

    def _apply_paths(self) -> None:
        """Set `self.paths` on the routed layers (no path elsewhere). The CUDA graphs are dropped only
        when some layer got a new path buffer or new slice leaves (a path of another size): a
        same-size path is copied into the old buffer (`TrelmFFN.set_path`), which the graphs read."""
        from trelm_fast.ffn import ffn_modules

        ffns = ffn_modules(self.model.mlm)

        def path_tensors() -> list:
            return [t for ffn in ffns for t in (ffn.path, *ffn.leaves)]

        before = path_tensors()
        routed = dict(zip(self.router.layers, self.paths))
        for i, ffn in enumerate(ffns):
            ffn.set_path(routed.get(i))  # host paths: set_path checks them there and moves them
        after = path_tensors()
        reallocated = len(after) != len(before) or any(a is not b for a, b in zip(after, before))
        if self.graphs is not None and reallocated:  # the graphs point at the old tensors
            self.graphs.invalidate()

    def _refresh_paths(self, batch: dict, step_index: int, epoch: float, negatives: Tensor) -> dict:
        """Attribution (eqs. 9-11) and selection (eq. 12) on this batch; returns timing/path stats."""
        from trelm_fast.routing import attribute_reference, path_stats, reduce_scores, select_paths

        t0 = time.perf_counter()
        self.model.eval()  # attribution sees the model without dropout
        with torch.no_grad():
            hidden = self.model.embedding_output(batch, epoch)
        self.model.train()
        r = self.cfg.routing
        if self.spec.routing == "fused":
            self.router.refresh(step_index, hidden, batch["attention_mask"], batch["cka_labels"], negatives)
            paths, stats = self.router.paths, dict(self.router.stats)
        else:  # the Knowledge-Neurons loop runs whole under the attribution's autocast
            with autocast(self.device.type, self.router.autocast):
                attr = attribute_reference(self.model.mlm, hidden, batch["attention_mask"], batch["cka_labels"],
                                           negatives, m=r.m, quadrature_rule=r.quadrature,
                                           layers=self.router.layers, sequences=r.sequences, head=self.head)
            paths = [p.cpu() for p in select_paths(reduce_scores(attr.scores), r.rule, r.fraction, r.threshold,
                                                   step_index)]
            stats = path_stats(self.router.layers, paths, self.paths)
            self.router.paths = paths
        self.paths = paths
        if self.spec.routing == "fused":
            self._apply_paths()
        stats["time/attribution_s"] = time.perf_counter() - t0
        return stats

    def _mask_to_paths(self) -> None:
        """trelm_naive: keep only the path rows/columns of the dense FFN gradients."""
        routed = dict(zip(self.router.layers, self.paths))
        adapter = self.model.adapter
        for i, layer in enumerate(adapter.layers(self.model.mlm)):
            site = adapter.ffn_site(layer)
            for proj, axis, blocks in site.projections():  # W1, b1, W2 (and the gate), as stored
                w, b = proj.linear.weight, proj.linear.bias if axis == 0 else None  # b2 is not per neuron
                keep = torch.zeros(site.width, dtype=torch.bool, device=w.device)
                if i in routed:
                    keep[routed[i].to(w.device)] = True
                keep = keep.repeat(blocks)
                w_keep = keep[:, None] if site.neuron_dim(axis) == 0 else keep[None, :]
                for p, mask in ((w, w_keep), (b, keep)):
                    if p is not None and p.grad is not None:
                        p.grad.mul_(mask.to(p.grad.dtype))

    # ------------------------------------------------------------------------- the objective

    def prepare(self, batch: dict) -> dict:
        """The host batch with the index fields (`prepare_batch`, unless the loader added them) and
        ``cka_negatives`` [N_cka, K] (drawn from Q with the step's generator for the real CKA targets,
        unless present), padded to static shapes (`pad_static`) when `train.static_shapes` is on."""
        causal = self.model.causal
        if not is_prepared(batch):
            batch = prepare_batch(batch, causal)
        elif batch["label_shift"] != int(causal):
            raise ValueError(f"batch: prepared with label_shift {batch['label_shift']}, but the model is "
                             f"{'a decoder (1)' if causal else 'a masked LM (0)'}: build its collator with "
                             f"causal={causal}")
        if "cka_negatives" not in batch:
            targets = batch["cka_targets"]
            real = targets[:batch["cka_count"]]  # the draws do not depend on the padding
            negatives = self.negatives(real, self.cfg.loss.num_negatives, generator=self.generator)
            batch = {**batch, "cka_negatives": pad_rows(negatives, targets.shape[0])}
        return pad_static(batch) if self.static_shapes else batch

    def _encoder_mask(self, batch: dict) -> Optional[Tensor]:
        """The attention mask the encoder gets: None for a batch without padding; with padding under
        SDPA attention a 4-D boolean [B, 1, 1, n] (transformers takes a 4-D mask as it is, where from
        a 2-D one it would ask the device whether it is all ones: a host sync); else the 2-D mask,
        always for decoders (a 4-D mask taken as it is would drop their causal mask). A batch with
        static shapes always gets the mask (one graph whether or not it has padding)."""
        if batch["tokens"] == batch["input_ids"].numel() and not batch.get("static_shapes"):
            return None
        mask = batch["attention_mask"]
        if self.model.mlm.config._attn_implementation == "sdpa" and not self.model.causal:
            return mask.bool()[:, None, None, :]
        return mask

    def _objective(self, batch: dict, epoch: float | Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(total, mlm, cka, final hidden states or None) for the method's objective on a prepared batch."""
        model, theta, head = self.model, self.cfg.loss.theta, self.head
        kind, negatives = self.spec.objective, batch["cka_negatives"]
        if kind == "trelm":
            hidden = model(batch, epoch)
            out = trelm_loss_at(hidden, batch["mlm_positions"], batch["mlm_targets"], batch["cka_positions"],
                                batch["cka_targets"], negatives, head, theta,
                                batch.get("mlm_weight"), batch.get("cka_weight"))
            return out.total, out.mlm, out.cka, hidden
        zero = torch.zeros((), device=self.device)
        if kind == "hf_full_cka":
            labelled = batch["mlm_count"] > 0
            out = model.mlm(inputs_embeds=model.input_embeddings(batch, epoch),
                            attention_mask=batch["attention_mask"],
                            labels=batch["mlm_labels"] if labelled else None, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            mlm = out.loss if labelled else out.logits.sum() * 0.0  # decoders: transformers shifts the labels
            cka = cka_loss_at(hidden, batch["cka_positions"], batch["cka_targets"], negatives, head,
                              batch.get("cka_weight"))
            return theta * mlm + (1.0 - theta) * cka, mlm, cka, hidden
        if kind == "hf_stock":
            out = model.mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["mlm_labels"])
            return out.loss, out.loss, zero, None
        hidden = model.encoder_model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
        mlm = mlm_loss_at(hidden, batch["mlm_positions"], batch["mlm_targets"], head, batch.get("mlm_weight"))
        return mlm, mlm, zero, None

    # ------------------------------------------------------------------------- the step

    def reduce_grads(self) -> None:
        """Under torch.distributed: average dense and slice gradients across ranks (a no-op otherwise)."""
        if not is_distributed():
            return
        grads = []
        for p in self.dense_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        _allreduce_mean(grads)
        if self.spec.routing == "fused":
            from trelm_fast.optim import allreduce_slice_grads

            allreduce_slice_grads(self.model.mlm)

    # ------------------------------------------------------------------------- the step's phases

    def refresh_due(self, step_index: int) -> bool:
        """Whether optimizer step ``step_index`` refreshes the knowledge paths (routed methods: the
        first step, then every `routing.refresh` steps)."""
        return self.router is not None and (self.paths is None or step_index % self.cfg.routing.refresh == 0)

    def begin(self, batch: dict, step_index: int, epoch: float) -> dict:
        """Start optimizer step ``step_index``: train mode, no gradients, and a path refresh on
        ``batch`` (prepared, on the device) when one is due. Returns the refresh's stats."""
        self.model.train()
        self.optimizer.zero_grad()
        if self.refresh_due(step_index):
            # a batch without CKA targets on every rank has nothing to attribute: keep the old paths
            if self.paths is None or _any_rank(batch["cka_count"] > 0, self.device):
                negatives = batch["cka_negatives"][:batch["cka_count"]]  # paired with cka_labels: no padding
                return self._refresh_paths(batch, step_index, epoch, negatives)
        return {}

    def accumulate(self, batch: dict, epoch: float | Tensor, weights: tuple[float, float] = (1.0, 1.0),
                   backward: Optional[Callable[[Tensor], None]] = None) -> MicroBatch:
        """Forward, loss and backward of one micro-batch (prepared, on the device), its gradients
        added to those already held. ``weights`` scale its MLM and CKA terms: its share of the step's
        labelled positions and CKA targets (`share_of_items`), so that the micro-batches' gradients
        sum to the gradient of their concatenation. ``backward``: the step's precision (fp16 loss
        scaling) by default; the Hugging Face Trainer passes its accelerator's. ``epoch``: a float, or
        a 0-dim tensor read on the device (`trelm_fast.graphs`)."""
        encoder_batch = {**batch, "attention_mask": self._encoder_mask(batch)}
        with self.precision.autocast():
            total, mlm, cka, hidden = self._objective(encoder_batch, epoch)
            if weights != (1.0, 1.0):
                mlm, cka = mlm * weights[0], cka * weights[1]
                total = self.theta * mlm + (1.0 - self.theta) * cka
        (backward or self.precision.backward)(total)
        return MicroBatch(total.detach(), mlm.detach(), cka.detach(), ~torch.isfinite(total.detach()),
                          None if hidden is None else hidden.detach(), batch)

    @property
    def theta(self) -> float:
        """The MLM weight of the total loss theta * MLM + (1 - theta) * CKA (1 without CKA)."""
        return self.cfg.loss.theta if self.spec.objective in ("trelm", "hf_full_cka") else 1.0

    def finish(self, skip: Optional[Tensor]) -> tuple[bool, Optional[Tensor], dict]:
        """End the optimizer step: average gradients across ranks, clip them (``train.max_grad_norm``)
        and apply them unless ``skip`` (a bool scalar tensor, read on the device). Returns (whether the
        fp16 scaler applied them, the norm before clipping or None, stats)."""
        if self.spec.routing == "naive":
            self._mask_to_paths()
        self.reduce_grads()
        stepped, norm = self.precision.step(self.optimizer, skip, self.cfg.train.max_grad_norm)
        self.optimizer.zero_grad()
        return stepped, norm, self.precision.stats(stepped)

    def update_bank(self, micro: list[MicroBatch], epoch: float, skip: Optional[Tensor]) -> dict:
        """Memory-bank update (eq. 8) from each micro-batch's final hidden states, in order (nothing
        changes where ``skip`` is true); returns its stats."""
        return {"kmb/lambda": self.model.bank.lam(epoch)} if self.fold_into_bank(micro, skip) else {}

    def fold_into_bank(self, micro: list[MicroBatch], skip: Optional[Tensor]) -> bool:
        """The bank update of `update_bank` (device work only); False for a method without one."""
        bank = self.model.bank
        if bank is None or micro[0].hidden is None:
            return False
        for m in micro:
            b = m.batch
            bank.apply(m.hidden, b["entity_spans"], b["lengths"], b["entity_first"], b["entity_rounds"], skip,
                       context_at=self.model.context_positions(b["lengths"]), padded=bool(b.get("static_shapes")))
        return True

    def step(self, batch: dict | list[dict], step_index: int, epoch: float = 0.0) -> StepResult:
        """Run optimizer step ``step_index`` at ``epoch`` on ``batch`` (the loader's batch contract), or
        on a list of micro-batches (gradient accumulation, weighted as one batch of all of them).
        Under `train.cuda_graphs` a plain step is a graph replay (`graphed_step`)."""
        t_start = time.perf_counter()
        batches = [self.prepare(b) for b in (batch if isinstance(batch, list) else [batch])]
        counts = [item_counts(b) for b in batches]
        weights = share_of_items(counts)
        stats: dict = {"tokens": sum(b["tokens"] for b in batches), "cka_targets": sum(c[1] for c in counts)}
        if self.graphs is not None and len(batches) == 1 and not self.refresh_due(step_index):
            return self.graphed_step(batches[0], step_index, epoch, stats, t_start)
        batches = [move_batch(b, self.device) for b in batches]
        stats.update(self.begin(batches[0], step_index, epoch))
        stats["lr"] = self.optimizer.lr = lr_at(self.cfg, step_index)

        t0 = time.perf_counter()
        micro = [self.accumulate(b, epoch, w) for b, w in zip(batches, weights)]
        stats["time/forward_backward_s"] = time.perf_counter() - t0
        total, mlm, cka = (_sum([getattr(m, k) for m in micro]) for k in ("total", "mlm", "cka"))
        nonfinite = micro[0].nonfinite if len(micro) == 1 else torch.stack([m.nonfinite for m in micro]).any()
        skip = any_rank_flag(nonfinite)
        self.steps_done += 1
        self.record(step_index, skip, total)
        result = StepResult(total, mlm, cka, skip, stats)
        if self.precision.scaler is not None:  # fp16: the scaler syncs on its own flag anyway
            if bool(skip):
                self.optimizer.zero_grad()
                return result
            skip = None

        t0 = time.perf_counter()
        stepped, result.grad_norm, precision_stats = self.finish(skip)
        stats.update(precision_stats)
        stats["time/optimizer_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bank_stats = self.update_bank(micro, epoch, skip)
        if bank_stats:
            stats.update(bank_stats, **{"time/bank_s": time.perf_counter() - t0})
        stats["time/step_s"] = time.perf_counter() - t_start
        return result

    def graphed_step(self, batch: dict, step_index: int, epoch: float, stats: dict, t_start: float) -> StepResult:
        """A plain step on the prepared host ``batch`` through `self.graphs` (the copy into its static
        buffers, then the graph's replay, or its warm-up / capture, or on CPU its rehearsal)."""
        stats["lr"] = self.optimizer.lr = lr_at(self.cfg, step_index)  # into the device tensor the graph reads
        self.model.train()
        out = self.graphs.run(batch, epoch)
        total, mlm, cka, skip = out[0], out[1], out[2], out[3] > 0
        self.steps_done += 1
        self.record(step_index, skip, total)
        if self.model.bank is not None:
            stats["kmb/lambda"] = self.model.bank.lam(epoch)
        stats["time/step_s"] = time.perf_counter() - t_start
        return StepResult(total, mlm, cka, skip, stats, out[4] if out.numel() > 4 else None)

    # ------------------------------------------------------------------------- skipped steps

    _PENDING_MAX = 256
    """Unread step flags kept for `nonfinite_events`; older ones are folded into the count."""

    def record(self, step_index: int, skipped: Tensor, loss: Tensor) -> None:
        """Keep step ``step_index``'s skip flag and loss (device tensors) for `nonfinite_events`."""
        self._pending.append((step_index, skipped, loss.detach()))
        if len(self._pending) > self._PENDING_MAX:  # nobody reads the events: keep only the count
            self._nonfinite_read += int(torch.stack([f for _, f, _ in self._pending]).sum())
            self._pending.clear()

    def nonfinite_events(self) -> list[tuple[int, bool, float]]:
        """(step index, skipped for a non-finite loss, loss) of every step since the last call, read
        in one host sync; the skipped ones are added to `nonfinite_total`."""
        if not self._pending:
            return []
        flat = torch.stack([torch.stack([f.float(), l.float()]) for _, f, l in self._pending]).tolist()
        events = [(i, skipped > 0, loss) for (i, _, _), (skipped, loss) in zip(self._pending, flat)]
        self._pending.clear()
        self._nonfinite_read += sum(skipped for _, skipped, _ in events)
        return events

    @property
    def nonfinite_total(self) -> int:
        """Steps skipped for a non-finite loss so far (a host sync while unread flags are pending)."""
        pending = int(torch.stack([f for _, f, _ in self._pending]).sum()) if self._pending else 0
        return self._nonfinite_read + pending

    __call__ = step

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "method": self.method,
            "optimizer": self.optimizer.state_dict(),
            "paths": None if self.paths is None else [p.clone() for p in self.paths],
            "steps_done": self.steps_done,
            "nonfinite_total": self.nonfinite_total,
            "generator": self.generator.get_state(),
            "path_history": None if self.router is None else self.router.history.state_dict(),
            "precision": self.precision.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method:
            raise ValueError(f"step state is for method {state.get('method')!r}, this step runs {self.method!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        self._nonfinite_read, self._pending = int(state["nonfinite_total"]), []
        self.generator.set_state(state["generator"])
        if state.get("precision") is not None:  # absent in checkpoints written before it was kept
            self.precision.load_state_dict(state["precision"])
        self.paths = None if state["paths"] is None else [torch.as_tensor(p, dtype=torch.long) for p in state["paths"]]
        if self.graphs is not None:  # the graphs point at the optimizer state just replaced
            self.graphs.invalidate()
        if self.router is not None:
            self.router.paths = self.paths
            if state.get("path_history") is not None:  # absent in checkpoints written before it was kept
                self.router.history.load_state_dict(state["path_history"])
            if self.paths is not None and self.spec.routing == "fused":
                self._apply_paths()


def make_step(method: str, model: TrelmModel, cfg: Config) -> TrainStep:
    """The step object of ``method`` (one of config.METHODS) for ``model`` under ``cfg``."""
    return TrainStep(method, model, cfg)
