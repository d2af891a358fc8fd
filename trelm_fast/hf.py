"""TRELM inside the stock Hugging Face training loop: `TrelmTrainer`, `TrelmArguments`.

    args = TrelmArguments(output_dir="runs/hf", max_steps=300, per_device_train_batch_size=16,
                          learning_rate=1e-3, trelm_overrides=["data.dir=data/wiki-geo"])
    TrelmTrainer(args=args).train()        # builds the model and the dataset from the settings

`TrelmTrainer` is a `transformers.Trainer` whose training step is the TRELM step of
`trelm_fast.step.TrainStep`, run phase by phase inside the Trainer's loop:

| TRELM phase                                   | where it runs in the Trainer                          |
|-----------------------------------------------|-------------------------------------------------------|
| path refresh every `routing.refresh` steps    | first micro-batch of an optimizer step (`training_step`) |
| forward, loss, backward                       | `training_step`, once per micro-batch, through `accelerator.backward` (fp16 loss scaling) |
| gradient accumulation weights                 | `_get_num_items_in_batch`: the step's labelled positions and CKA targets |
| DDP averaging of dense and slice gradients    | last micro-batch of a step (explicit all-reduce, as `train.py`) |
| clipping (`max_grad_norm`)                    | `_clip_grad_norm`: dense parameters and path slices together |
| dense AdamW + slice AdamW                     | `TrelmTorchOptimizer.step` (from `create_optimizer`), at the scheduler's learning rate |
| memory-bank update                            | after the optimizer step (a callback), from each micro-batch's final hidden states |
| bank, paths, step state in checkpoints        | `_save_checkpoint` / `_load_from_checkpoint` (`trelm_state.*` beside the Trainer's files) |

Settings: the Trainer's own arguments own what they name (learning rate, weight decay, Adam betas
and epsilon, batch size, steps, accumulation, clipping, precision, seed); the method's settings
(model, data, method, loss, kmb, routing) come from the trelm_fast config: `trelm_config` (a YAML
file, see docs/training.md) and `trelm_overrides` (dotted `section.key=value`). The learning-rate
schedule is the Trainer's (`lr_scheduler_type`, `warmup_steps`), not `schedule.*`.

The batches are the ones `train.py` reads: `ResumableSampler` order and `MLMCollator` masking, both
seeded by the seed and each sequence's (epoch, index), so a run here and a `train.py` run with the
same settings see the same data (tests/test_hf.py checks the losses match for 20 steps).
Not supported: `Trainer.evaluate` (probe with `trelm_fast.probe`), DeepSpeed/FSDP, and datasets that
are not TRELM datasets (`TrelmDataset` or `to_hf_dataset`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from trelm_fast.checkpoint import export_pretrained, flatten_state, unflatten_state, verify_listed_files
from trelm_fast.config import Config, ConfigError, load_config, validate
from trelm_fast.data.checksums import file_checksums
from trelm_fast.data.loader import MLMCollator, ResumableSampler, TrelmDataset, load_manifest
from trelm_fast.optim import TrelmOptimizer
from trelm_fast.step import (MicroBatch, TrainStep, any_rank_flag, build_step_model, item_counts, item_share,
                             make_step, move_batch)

TRELM_STATE = "trelm_state"  # trelm_state.safetensors + trelm_state.json in each checkpoint-N
CHECKSUMS = "trelm_checksums.json"  # size and sha256 of every file of checkpoint-N, written last
MODEL_WEIGHTS = "trelm_model.safetensors"
DATASET_COLUMNS = ("input_ids", "length", "spans", "si")


@dataclass
class TrelmArguments(TrainingArguments):
    """`TrainingArguments` plus the TRELM method's settings (see the module docstring)."""

    trelm_config: Optional[str] = field(default=None, metadata={"help": "trelm_fast config YAML "
                                        "(model, data, method, loss, kmb, routing); default: the embedded one"})
    trelm_overrides: list[str] = field(default_factory=list, metadata={"help": "dotted overrides of the "
                                       "trelm_fast config, e.g. data.dir=data/wiki-geo routing.refresh=50"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "TRELM batches keep every column"})

    def trelm_settings(self) -> Config:
        """The trelm_fast Config: the file and overrides, then the fields these arguments own."""
        cfg = load_config(self.trelm_config, self.trelm_overrides)
        o, t = cfg.optim, cfg.train
        o.lr, o.weight_decay, o.beta1, o.beta2, o.eps = (self.learning_rate, self.weight_decay, self.adam_beta1,
                                                         self.adam_beta2, self.adam_epsilon)
        t.batch_size, t.grad_accum_steps = self.per_device_train_batch_size, self.gradient_accumulation_steps
        t.max_grad_norm = self.max_grad_norm
        t.precision = "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"
        if self.max_steps > 0:
            t.steps = self.max_steps
        cfg.seed, cfg.out_dir = self.seed, self.output_dir
        validate(cfg, "TrelmArguments")
        return cfg


class TrelmTorchOptimizer(torch.optim.Optimizer):
    """A `TrelmOptimizer` as a torch optimizer, for the Trainer's scheduler, GradScaler and accelerate.

    param_groups: the dense parameters, then the slice leaves of the current paths (`set_slices`
    after every path change), so fp16 unscaling and inf checks cover both. `step()` runs the dense
    AdamW and the slice AdamW at the learning rate the scheduler set on the groups (one rate: the
    scheduler scales every group alike; the slices step at it x `optim.slice_lr_scale`), changing
    nothing when ``skip`` (a bool scalar tensor, read on the device) is true. State is the
    TrelmOptimizer's own state dict.
    """

    def __init__(self, trelm: TrelmOptimizer):
        self.trelm = trelm
        self.skip: Optional[torch.Tensor] = None  # set per step by TrelmTrainer: a non-finite loss
        dense = [] if trelm.dense is None else [p for g in trelm.dense.param_groups for p in g["params"]]
        super().__init__([{"params": dense, "name": "dense"}, {"params": [], "name": "slices"}], {"lr": trelm.lr})
        self.set_slices()

    def set_slices(self) -> None:
        """Point the "slices" group at the slice leaves of the current paths."""
        n_dense = len(self.param_groups[0]["params"])
        self.param_groups[1]["params"] = self.trelm.trained_tensors()[n_dense:]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("TrelmTorchOptimizer.step: closures are not supported")
        self.trelm.lr = self.param_groups[0]["lr"]
        self.trelm.step(self.skip)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.trelm.zero_grad()

    def state_dict(self) -> dict:
        """The TrelmOptimizer's state, with the rate the scheduler set for the next step."""
        return {**self.trelm.state_dict(), "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.trelm.load_state_dict(state_dict)
        for group in self.param_groups:
            group["lr"] = self.trelm.lr


class _KeyedRows(Dataset):
    """A `datasets.Dataset` of `to_hf_dataset` rows read with the `(epoch, index)` keys of
    `ResumableSampler`, as `TrelmDataset` items (tensors)."""

    def __init__(self, rows, manifest: dict):
        missing = [c for c in DATASET_COLUMNS if c not in rows.column_names]
        if missing:
            raise ValueError(f"TrelmTrainer: train_dataset has no column(s) {missing} (columns: {rows.column_names}); "
                             "give a TrelmDataset or trelm_fast.hf.to_hf_dataset(dataset_dir)")
        self.rows, self.manifest = rows, manifest

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> dict:
        epoch, i = key
        r = self.rows[i]
        return {"index": i, "epoch": epoch, "input_ids": torch.tensor(r["input_ids"], dtype=torch.long),
                "length": int(r["length"]), "spans": torch.tensor(r["spans"], dtype=torch.long).reshape(-1, 6),
                "si": torch.tensor(r["si"], dtype=torch.float32)}


def to_hf_dataset(dataset_dir: str | os.PathLike, split: str = "train"):
    """A built TRELM dataset's ``split`` as a `datasets.Dataset` (columns index, input_ids, length,
    spans [k, 6], si [k]; the manifest in ``info.description``), for `TrelmTrainer` or `datasets` tools."""
    import datasets

    ds = TrelmDataset(dataset_dir, split)

    def rows():
        for i in range(len(ds)):
            item = ds[i]
            yield {"index": i, "input_ids": item["input_ids"].tolist(), "length": item["length"],
                   "spans": item["spans"].tolist(), "si": item["si"].tolist()}

    info = datasets.DatasetInfo(description=json.dumps(ds.manifest))
    return datasets.Dataset.from_generator(rows, info=info, keep_in_memory=True)


class _BankUpdate(TrainerCallback):
    """After each optimizer step: the memory-bank update from the step's micro-batches."""

    def __init__(self, trainer: "TrelmTrainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()


class TrelmTrainer(Trainer):
    """A `transformers.Trainer` that trains with TRELM steps (see the module docstring).

    model: a `TrelmModel` (`trelm_fast.step.build_step_model`) for the method in the settings; built
    from them when None. train_dataset: a `TrelmDataset`, a `to_hf_dataset` `datasets.Dataset`, or
    None for the `data.dir` train split. trelm_config: the settings, default
    ``args.trelm_settings()``. Other keyword arguments go to `Trainer`.
    """

    def __init__(self, model=None, args: Optional[TrelmArguments] = None, train_dataset=None,
                 trelm_config: Optional[Config] = None, **kwargs):
        if args is None:
            raise ValueError("TrelmTrainer needs args (TrelmArguments)")
        cfg = trelm_config or args.trelm_settings()
        if cfg.train.precision == "fp16" and not args.fp16:
            raise ConfigError("train.precision fp16: set fp16=True in the Trainer's arguments (its scaler is used)")
        data_dir = Path(cfg.data.dir)
        if model is None:
            torch.manual_seed(cfg.seed)
            model = build_step_model(cfg.method.name, cfg, data_dir, device=args.device)
        if train_dataset is None:
            train_dataset = TrelmDataset(data_dir, "train")
        self.trelm_config = cfg
        self.trelm_step: TrainStep = make_step(cfg.method.name, model, cfg)
        self._micro: list[MicroBatch] = []  # the current optimizer step's micro-batches
        self._skip: Optional[torch.Tensor] = None  # the current step had a non-finite loss (on any rank)
        self._losses: Optional[torch.Tensor] = None  # [2] MLM and CKA loss summed since the last log
        self._steps_since_log = 0
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self.add_callback(_BankUpdate(self))

    # ------------------------------------------------------------------------- data

    def get_train_dataloader(self) -> DataLoader:
        """train.py's batches: `ResumableSampler` order (the Trainer's epochs), `MLMCollator` masking."""
        ds = self.train_dataset
        if isinstance(ds, TrelmDataset):
            manifest = ds.manifest
        else:
            manifest = json.loads(ds.info.description or "null") or load_manifest(self.trelm_config.data.dir)
            ds = _KeyedRows(ds, manifest)
        cfg = self.trelm_config
        sampler = ResumableSampler(len(ds), shuffle=True, seed=cfg.seed, drop_last=True)
        loader = DataLoader(ds, batch_size=self._train_batch_size, sampler=sampler, drop_last=True,
                            collate_fn=MLMCollator.for_config(manifest, cfg, self.trelm_step.model.causal,
                                                              self.trelm_step.device),
                            num_workers=self.args.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed))
        # batches stay on the host: the step draws their CKA negatives there, then moves them
        return self.accelerator.prepare_data_loader(loader, device_placement=False)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> tuple[int, int]:
        """The labelled MLM positions and CKA targets of the optimizer step's micro-batches (host counts
        from the collated index fields)."""
        counts = [item_counts(b) for b in batch_samples]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    # ------------------------------------------------------------------------- the step

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = TrelmTorchOptimizer(self.trelm_step.optimizer)
        return self.optimizer

    def training_step(self, model, inputs: dict, num_items_in_batch: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """One micro-batch: refresh (first micro-batch of a step, when due), forward, weighted loss,
        backward; after the last one, the non-finite check across ranks and the DDP all-reduce.
        Returns the weighted loss (detached). No host sync (fp32/bf16)."""
        step = self.trelm_step
        batch = move_batch(step.prepare(inputs), step.device)
        epoch = self._data_epoch
        if not self._micro:
            paths = step.paths
            step.begin(batch, self.state.global_step, epoch)
            if step.paths is not paths:
                self._optimizer().set_slices()
        counts = item_counts(batch)
        weights = item_share(counts, num_items_in_batch or counts)
        micro = step.accumulate(batch, epoch, weights, backward=self.accelerator.backward)
        self._micro.append(micro)
        parts = torch.stack([micro.mlm, micro.cka]).float()
        self._losses = parts if self._losses is None else self._losses + parts
        if self.accelerator.sync_gradients:
            nonfinite = torch.stack([m.nonfinite for m in self._micro]).any()
            self._skip = any_rank_flag(nonfinite)
            step.record(self.state.global_step, self._skip, torch.stack([m.total for m in self._micro]).sum())
            step.reduce_grads()
            self._optimizer().skip = self._skip
        return micro.total

    @property
    def _data_epoch(self) -> float:
        """The epoch of the data being read (whole; the Trainer's `state.epoch` counts fractions)."""
        return float(math.floor(self.state.epoch or 0.0))

    def _optimizer(self) -> TrelmTorchOptimizer:
        opt = self.optimizer
        return getattr(opt, "optimizer", opt)  # accelerate wraps it

    def _clip_grad_norm(self, model):
        """Clip dense and slice gradients together (unscaled first under fp16)."""
        return self.accelerator.clip_grad_norm_(self.trelm_step.optimizer.trained_tensors(), self.args.max_grad_norm)

    def _after_optimizer_step(self) -> None:
        """Bank update from the step's micro-batches (no change after a non-finite loss); a new step
        begins."""
        step = self.trelm_step
        step.update_bank(self._micro, self._data_epoch, self._skip)
        step.steps_done += 1
        self._steps_since_log += 1
        self._micro = []

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """Adds ``mlm_loss`` and ``cka_loss`` (means over the optimizer steps since the last log)."""
        if "loss" in logs and self._losses is not None:
            steps = max(1, self._steps_since_log)
            logs["mlm_loss"], logs["cka_loss"] = (round(v / steps, 4) for v in self._losses.tolist())
            logs["nonfinite_total"] = self.trelm_step.nonfinite_total
            self._losses, self._steps_since_log = None, 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------------- checkpoints

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """``trelm_model.safetensors``: the training model's weights (knowledge projection included, tied
        weights once; what a resume loads); ``model/``: the plain `transformers` MLM
        (`export_pretrained`: FFNs unswapped, loadable by `AutoModelForMaskedLM.from_pretrained`);
        ``trelm_config.json``: the method's settings."""
        from safetensors.torch import save_model

        if not self.args.should_save:  # the main process writes
            return
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        save_model(model, str(out / MODEL_WEIGHTS))
        export_pretrained(model.mlm, out / "model", self.processing_class)
        (out / "trelm_config.json").write_text(json.dumps(self.trelm_config.to_dict(), indent=1))

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then the TRELM state (paths, step counters, generator, bank)."""
        from safetensors.torch import save_file

        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        out = Path(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        state = {"step": {k: v for k, v in self.trelm_step.state_dict().items() if k != "optimizer"}}
        if self.trelm_step.model.bank is not None:
            state["bank"] = self.trelm_step.model.bank.state_dict()
        skeleton, tensors = flatten_state(state)
        save_file(tensors, str(out / f"{TRELM_STATE}.safetensors"))
        (out / f"{TRELM_STATE}.json").write_text(json.dumps(skeleton))
        (out / CHECKSUMS).write_text(json.dumps(file_checksums(out), indent=1))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Weights and TRELM state of a checkpoint written by `_save_checkpoint` (the Trainer loads the
        optimizer, scheduler and RNG states itself)."""
        from safetensors.torch import load_file, load_model

        ck = Path(resume_from_checkpoint)
        files = [ck / MODEL_WEIGHTS, ck / f"{TRELM_STATE}.safetensors", ck / f"{TRELM_STATE}.json"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{ck}: not a complete TrelmTrainer checkpoint (missing {', '.join(missing)})")
        verify_listed_files(ck, ck / CHECKSUMS, {f.name for f in files}, "earlier trelm_fast (no checksums)")
        load_model(self.accelerator.unwrap_model(model or self.model), str(files[0]))
        state = unflatten_state(json.loads(files[2].read_text()), load_file(str(files[1])))
        step = self.trelm_step
        step.load_state_dict({**state["step"], "optimizer": step.optimizer.state_dict()})
        if step.model.bank is not None:
            step.model.bank.load_state_dict(state["bank"])
        if self.optimizer is not None:
            self._optimizer().set_slices()
