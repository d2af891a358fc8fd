"""One training step as an object: what `train.py` drives and `benchmarks/run.py` times.

    step = make_step("trelm", model, cfg)          # model: a TrelmModel (see `build_step_model`)
    result = step(batch, step_index, epoch=0.0)    # StepResult(loss, mlm_loss, cka_loss, ...)

Methods (paper table 6 and DESIGN.md section 3):

| method        | injection | bank | routing       | objective                                   | trained                     |
|---------------|-----------|------|---------------|---------------------------------------------|-----------------------------|
| `trelm`       | yes       | yes  | fused, every R| MLM at labelled positions + CKA (eq. 3)     | path slices + `method.trainable` groups (default: MLM head, knowledge projection) |
| `trelm_fast`  | = `trelm` (the benchmark name)                                                                          |
| `no_injection`| no        | yes  | fused         | as `trelm`                                  | as `trelm`                  |
| `no_kmb`      | yes       | no   | fused         | as `trelm`                                  | as `trelm`                  |
| `no_routing`  | yes       | yes  | none          | as `trelm`                                  | every parameter (AdamW)     |
| `dense`       | yes       | yes  | none          | stock HF full-vocabulary MLM at all positions + CKA | every parameter (AdamW) |
| `trelm_naive` | yes       | yes  | per-layer KN loop | as `trelm`, dense FFN gradients then masked to the paths | as `trelm` (AdamW on masked gradients) |
| `hf_dense`    | no        | no   | none          | stock `BertForMaskedLM(labels=...)` MLM     | every parameter (AdamW)     |
| `dense_opt`   | no        | no   | none          | MLM logits only at labelled positions       | every parameter (AdamW)     |

A step: move the batch to the model's device; refresh knowledge paths when due; forward; loss;
if the loss is not finite on any rank, skip (no update, gradients dropped) and say so; backward;
under torch.distributed average dense gradients (explicit all-reduce) and path slices
(`allreduce_slice_grads`); optimizer step at the scheduled learning rate; memory-bank update from
the final hidden states (after the forward, no gradient).

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
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trelm_fast.config import Config
from trelm_fast.distributed import is_distributed
from trelm_fast.losses import IGNORE_INDEX, cka_loss, mlm_loss, sample_negatives, trelm_loss
from trelm_fast.model import TrelmModel, build_model
from trelm_fast.precision import MixedPrecision, autocast, set_tf32


@dataclass(frozen=True)
class MethodSpec:
    """What a method switches on: see the table in the module docstring."""
    inject: bool
    bank: bool
    routing: Optional[str]  # None, "fused" or "naive"
    objective: str  # "trelm", "hf_full_cka", "hf_stock", "labelled_mlm"

    @property
    def uses_paths(self) -> bool:
        return self.routing is not None


METHOD_SPECS = {
    "trelm": MethodSpec(True, True, "fused", "trelm"),
    "trelm_fast": MethodSpec(True, True, "fused", "trelm"),
    "no_injection": MethodSpec(False, True, "fused", "trelm"),
    "no_kmb": MethodSpec(True, False, "fused", "trelm"),
    "no_routing": MethodSpec(True, True, None, "trelm"),
    "dense": MethodSpec(True, True, None, "hf_full_cka"),
    "trelm_naive": MethodSpec(True, True, "naive", "trelm"),
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
    """Losses as Python floats (total = theta * MLM + (1 - theta) * CKA, or the method's own; cka_loss
    is 0.0 for the methods without CKA).

    stats: ``lr``, ``tokens`` (real tokens), ``cka_targets`` (CKA positions), seconds spent in
    ``time/{forward,backward,optimizer,bank,step}_s``; on refresh steps ``time/attribution_s`` and
    the router's ``routing/*`` path statistics; with a bank ``kmb/lambda``; on a skipped step
    ``nonfinite_total``; under fp16 the loss scale ``amp/scale`` and whether the scaler skipped the
    update, ``amp/skipped`` (this step) and ``amp/skipped_total``.
    """
    loss: float
    mlm_loss: float
    cka_loss: float
    skipped_nonfinite: bool
    stats: dict = field(default_factory=dict)


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


def move_batch(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _ffn_weights(model: TrelmModel) -> list[tuple[nn.Parameter, Optional[nn.Parameter], nn.Parameter]]:
    """(W1 [I, d], b1 [I], W2 [d, I]) of every layer, in layer order (swapped or not), from the family adapter."""
    sites = [model.adapter.ffn_site(layer) for layer in model.adapter.layers(model.mlm)]
    return [(s.up.linear.weight, s.up.linear.bias, s.down.linear.weight) for s in sites]


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
        self.precision = MixedPrecision(cfg.train.precision, self.device)
        set_tf32(self.device, cfg.train.tf32)
        rank = dist.get_rank() if is_distributed() else 0
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17 + rank)
        self.steps_done = 0
        self.nonfinite_total = 0
        self.paths: Optional[list[Tensor]] = None  # one sorted index tensor per routed layer
        self.router = None
        if self.spec.routing is not None:
            from trelm_fast.routing import KnowledgeRouter

            self.router = KnowledgeRouter.from_config(model.mlm, cfg.routing,
                                                      autocast=self.precision.attribution_dtype)
        self._setup_parameters()

    # ------------------------------------------------------------------------- set-up

    def _setup_parameters(self) -> None:
        """requires_grad flags and the optimizer of the method.

        Path methods train the `method.trainable` groups (trelm_fast.optim) plus the path slices;
        `trelm_naive` adds the dense FFN weights (masked after backward); the others train every
        group. The knowledge projection counts as group "other".
        """
        from trelm_fast.optim import DENSE_TRAINABLE, TrelmOptimizer, configure_trainable

        model, spec, o = self.model, self.spec, self.cfg.optim
        trainable = set(self.cfg.method.trainable) if spec.uses_paths else set(DENSE_TRAINABLE)
        if spec.routing == "naive":
            trainable.add("ffn")
        configure_trainable(model.mlm, trainable)
        model.injection.requires_grad_(spec.inject and "other" in trainable)
        modules = [model.mlm, model.injection]
        self.dense_params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.optimizer = TrelmOptimizer(modules, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                        weight_decay=o.weight_decay)

    # ------------------------------------------------------------------------- routing

    def _apply_paths(self) -> None:
        from trelm_fast.ffn import ffn_modules

        routed = dict(zip(self.router.layers, self.paths))
        for i, ffn in enumerate(ffn_modules(self.model.mlm)):
            path = routed.get(i)
            ffn.set_path(None if path is None else path.to(self.device))

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
            paths = [p.cpu() for p in select_paths(reduce_scores(attr.scores), r.rule, r.fraction, r.threshold)]
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
        for i, (w1, b1, w2) in enumerate(_ffn_weights(self.model)):
            keep = torch.zeros(w1.shape[0], dtype=torch.bool, device=w1.device)
            if i in routed:
                keep[routed[i].to(w1.device)] = True
            for p, mask in ((w1, keep[:, None]), (b1, keep), (w2, keep[None, :])):
                if p is not None and p.grad is not None:
                    p.grad.mul_(mask.to(p.grad.dtype))

    # ------------------------------------------------------------------------- the objective

    def _negatives(self, batch: dict) -> Tensor:
        targets = batch["cka_labels"][batch["cka_labels"].ne(IGNORE_INDEX)]
        k = self.cfg.loss.num_negatives
        if targets.numel() == 0:
            return torch.zeros(0, k, dtype=torch.long, device=self.device)
        return sample_negatives(targets, self.model.negative_q, k, generator=self.generator)

    def _objective(self, batch: dict, epoch: float, negatives: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(total, mlm, cka, final hidden states or None) for the method's objective."""
        model, theta, head = self.model, self.cfg.loss.theta, self.head
        kind = self.spec.objective
        if kind == "trelm":
            hidden = model(batch, epoch)
            out = trelm_loss(hidden, batch["mlm_labels"], batch["cka_labels"], negatives, head, theta)
            return out.total, out.mlm, out.cka, hidden
        zero = torch.zeros((), device=self.device)
        if kind == "hf_full_cka":
            labelled = bool(batch["mlm_labels"].ne(IGNORE_INDEX).any())
            out = model.mlm(inputs_embeds=model.input_embeddings(batch, epoch),
                            attention_mask=batch["attention_mask"],
                            labels=batch["mlm_labels"] if labelled else None, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            mlm = out.loss if labelled else out.logits.sum() * 0.0
            cka = cka_loss(hidden, batch["cka_labels"], negatives, head)
            return theta * mlm + (1.0 - theta) * cka, mlm, cka, hidden
        if kind == "hf_stock":
            out = model.mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["mlm_labels"])
            return out.loss, out.loss, zero, None
        hidden = model.encoder_model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
        mlm = mlm_loss(hidden, batch["mlm_labels"], head)
        return mlm, mlm, zero, None

    # ------------------------------------------------------------------------- the step

    def _reduce_grads(self) -> None:
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

    def step(self, batch: dict, step_index: int, epoch: float = 0.0) -> StepResult:
        """Run one step on ``batch`` (the loader's batch contract) at ``step_index`` and ``epoch``."""
        t_start = time.perf_counter()
        batch = move_batch(batch, self.device)
        self.model.train()
        self.optimizer.zero_grad()
        negatives = self._negatives(batch)
        stats: dict = {}
        if self.router is not None and (self.paths is None or step_index % self.cfg.routing.refresh == 0):
            # a batch without CKA targets on every rank has nothing to attribute: keep the old paths
            if self.paths is None or _any_rank(negatives.shape[0] > 0, self.device):
                stats.update(self._refresh_paths(batch, step_index, epoch, negatives))
        lr = lr_at(self.cfg, step_index)
        self.optimizer.lr = lr

        t0 = time.perf_counter()
        with self.precision.autocast():
            total, mlm, cka, hidden = self._objective(batch, epoch, negatives)
        stats["time/forward_s"] = time.perf_counter() - t0
        if _any_rank(not bool(torch.isfinite(total)), self.device):
            self.nonfinite_total += 1
            self.steps_done += 1
            stats.update({"lr": lr, "nonfinite_total": self.nonfinite_total})
            return StepResult(float(total.detach()), float(mlm.detach()), float(cka.detach()), True, stats)

        t0 = time.perf_counter()
        self.precision.backward(total)
        if self.spec.routing == "naive":
            self._mask_to_paths()
        self._reduce_grads()
        stats["time/backward_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stepped = self.precision.step(self.optimizer)
        self.optimizer.zero_grad()
        stats["time/optimizer_s"] = time.perf_counter() - t0
        stats.update(self.precision.stats(stepped))
        if hidden is not None and self.model.bank is not None:
            t0 = time.perf_counter()
            self.model.update_bank(hidden, batch)
            stats["time/bank_s"] = time.perf_counter() - t0
            stats["kmb/lambda"] = self.model.bank.lam(epoch)
        self.steps_done += 1
        stats.update({"lr": lr, "tokens": int(batch["attention_mask"].sum()),
                      "cka_targets": int(negatives.shape[0]), "time/step_s": time.perf_counter() - t_start})
        return StepResult(float(total.detach()), float(mlm.detach()), float(cka.detach()), False, stats)

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
        self.nonfinite_total = int(state["nonfinite_total"])
        self.generator.set_state(state["generator"])
        if state.get("precision") is not None:  # absent in checkpoints written before it was kept
            self.precision.load_state_dict(state["precision"])
        self.paths = None if state["paths"] is None else [torch.as_tensor(p, dtype=torch.long) for p in state["paths"]]
        if self.router is not None:
            self.router.paths = self.paths
            if state.get("path_history") is not None:  # absent in checkpoints written before it was kept
                self.router.history.load_state_dict(state["path_history"])
            if self.paths is not None and self.spec.routing == "fused":
                self._apply_paths()


def make_step(method: str, model: TrelmModel, cfg: Config) -> TrainStep:
    """The step object of ``method`` (one of config.METHODS) for ``model`` under ``cfg``."""
    return TrainStep(method, model, cfg)
