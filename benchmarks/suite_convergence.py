"""`convergence` suite: wall-clock to the same knowledge, dense vs TRELM and the paper's ablations.

Datasets (`DATASETS`): `wiki-geo` (real Wikipedia text, GeoNames facts) and the `small` synthetic set
(built with 64-token sequences: its documents are at most 59 tokens), each built once into
`data_cache/<DatasetPlan.cache>`; --quick runs the `tiny` synthetic set only, with a random-init
2-layer model instead of MiniLM (a smoke run).

The common start: the bundled pre-trained MiniLM with an MLM head that already predicts tokens,
`trelm_fast.warmup.warm_up_head` on the dataset (built once, cached in `data_cache/warm`, its valid
MLM loss and probe P@1 before/after in the notes). Every variant of one seed starts from those
weights and the same knowledge-projection init, and reads the same batches in the same order and
masking (the trainer's own `trelm_fast.train.batches`, `build_step_model`, `make_step`).

Variants (`VARIANTS`): `dense` (`--method dense`, every parameter), `trelm`, and the ablations of the
paper's section 4.7 / table 6 on the same footing: `kmb_only` (`no_routing`: the bank without
routing, every parameter trained), `routing_only` (`no_kmb`), `no_injection`. `INVESTIGATION` holds
named variants of `trelm` with one setting changed (why trelm does or does not reach dense).
--case '<dataset>/<variant>' selects some (dense always runs with them: the targets are its).

Per dataset and variant:
0. step-time calibration: each variant makes `CALIBRATION_STEPS` steps from the common start; the
   median time of the timed ones sets its learning-rate warm-up, `LR_WARMUP_SHARE` of a run's
   budget in steps (at least 1), the same share of wall-clock for every variant.
1. learning-rate sweep: each of the variant's `lrs` (at least 3; whole-model methods get lower ones
   than the slice methods) trains seed 0 for `sweep_s` seconds of step time; the lowest validation
   MLM loss at the end picks the variant's rate. Every figure goes into the results (case
   `<dataset>/sweep lr=<lr>`, metric final_loss).
2. seeds 0, 1, 2 at the chosen rate, `budget_s` seconds of step time each; the variants of one seed
   advance in turns, one step each, each with its own clock counting its step time only (not data
   loading or evaluation), so a change in the load of a shared machine hits them alike. Evaluation
   every `budget_s / evals` seconds of a variant's own clock: macro P@1 on the dataset's stated facts
   and on its held-out facts (KG only, never stated in the corpus), and the validation MLM loss
   (cross-entropy at the masked positions of a fixed masked subset of the valid split).
3. targets from dense's own curve of the same seed: 80% of the improvement dense made from the
   common start (P@1 >= p0 + 0.8 (best - p0), loss <= l0 - 0.8 (l0 - lowest)); time_to_target_s is
   a variant's clock at its first evaluation meeting it. Where dense did not improve a measure there
   is no target; a variant that never meets it counts as not reached.

Records: case `<dataset>/<measure>` with measure `p_at_1_stated`, `p_at_1_heldout`, `mlm_loss`;
`final_p_at_1` / `final_loss` at the end of the budget, i.e. at equal wall-clock, and
`time_to_target_s`, each the median over the seeds with tags `min`, `max`, `seeds` (how many seeds
the median is over; for time_to_target_s the seeds that reached the target). Curves:
`<dataset>/<variant>/seed<k>`.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from harness import Results, Settings, require

SUITE = "convergence"
FRACTION = 0.8
SEEDS = (0, 1, 2)
WHOLE_MODEL_LRS = (1e-5, 3e-5, 1e-4, 3e-4)
SLICE_LRS = (3e-4, 1e-3, 3e-3)
"""The sweep's grids. Whole-model methods reach 3e-4: in the horizon's 1000-1500 s runs (docs/results.md)
`dense` learned the frequent facts faster at 3e-4 than at 1e-4, a rate a grid ending at 1e-4 could not choose."""
LR_WARMUP_SHARE = 0.1
"""The learning-rate warm-up of every run is this share of its step-time budget (in steps at the
variant's measured step time), so a slower method is not still warming up when its budget ends."""
CALIBRATION_STEPS = 4
"""Steps of a variant's step-time calibration (the first is not timed)."""
MEASURES = {"p_at_1_stated": "p_at_1_stated", "p_at_1_heldout": "p_at_1_heldout", "mlm_loss": "valid_mlm_loss"}
"""Record case suffix -> curve key."""


@dataclass(frozen=True)
class Variant:
    """A trainer method with its learning-rate grid, config overrides (dotted `key=value`) and
    dataset build options (`BuildConfig` fields) that differ from the dataset's: such a variant
    reads a dataset of its own, built from the same source (the same text, KG and probes)."""
    method: str
    lrs: tuple[float, ...]
    overrides: tuple[str, ...] = ()
    data: dict = field(default_factory=dict)

    def describe(self) -> str:
        changes = [*self.overrides, *(f"data.build_args.{k}={v}" for k, v in self.data.items())]
        return self.method + (", " + " ".join(changes) if changes else "")


VARIANTS = {
    "dense": Variant("dense", WHOLE_MODEL_LRS),
    "trelm": Variant("trelm", SLICE_LRS),
    "kmb_only": Variant("no_routing", WHOLE_MODEL_LRS),
    "routing_only": Variant("no_kmb", SLICE_LRS),
    "no_injection": Variant("no_injection", SLICE_LRS),
}
INVESTIGATION = {
    "trelm_refresh10": Variant("trelm", SLICE_LRS, ("routing.refresh=10",)),
    "trelm_objects": Variant("trelm", SLICE_LRS, data={"stated_objects_first": True, "si_min_quantile": 0.0}),
}
"""Named `trelm` variants with one setting changed, run beside the others: why trelm does or does
not reach dense. `trelm_refresh10`: knowledge paths re-attributed every 10 steps instead of 50 (a
run of this suite makes only tens of trelm steps, so at R = 50 nearly every batch trains the paths
of its run's first batch). `trelm_objects`: injection targets are first the objects of the facts a
sequence states (`BuildConfig.stated_objects_first`), the entities the probes ask for, with no SI
floor (objects are frequent words of low SI: with the floor only 22% of the small set's targets are
objects, without it 78%); by default the long-tail entities come first, on the synthetic set its
people, the probes' subjects (86% of its targets)."""
ALL_VARIANTS = {**VARIANTS, **INVESTIGATION}
"""Every variant of the suite by name (--case selects among them)."""
DIAGNOSTICS = {
    "trelm_paths30": Variant("trelm", SLICE_LRS, ("routing.fraction=0.3",)),
    "trelm_attention": Variant("trelm", SLICE_LRS,
                               ("method.trainable=[embeddings,head,other,attention,layernorm]",)),
    "trelm_theta08": Variant("trelm", SLICE_LRS, ("loss.theta=0.8",)),
    "trelm_theta08_paths30": Variant("trelm", SLICE_LRS, ("loss.theta=0.8", "routing.fraction=0.3")),
    "trelm_random_paths": Variant("trelm", SLICE_LRS, ("routing.rule=random",)),
    "trelm_frozen_embeddings": Variant("trelm", SLICE_LRS, ("method.trainable=[head,other]",)),
    "trelm_slice_lr2": Variant("trelm", SLICE_LRS, ("optim.slice_lr_scale=2",)),
    "frozen_dense": Variant("frozen_dense", WHOLE_MODEL_LRS),
}
"""Long-run diagnostics, for benchmarks/convergence_horizon.py only (not run by the suite): why does
trelm level off lower than dense? (On the H100 its P@1 on the facts said 10+ times levelled off near
0.6 while dense's rose past 0.8 in as many steps.) What it trains: `trelm_paths30`, paths of 30% of
each FFN's neurons instead of 10%; `trelm_attention`, attention and layer norms trained whole beside
the paths, outside the paper's method (which updates only FFN paths inside a block). How it weighs
its objective: `trelm_theta08`, theta = 0.8 in eq. 3 (0.8 MLM + 0.2 CKA instead of 0.5 each; the
probes ask for a masked object, an MLM prediction). `trelm_theta08_paths30`: both changes at once.
Whether attribution matters: `trelm_random_paths`, paths drawn at random at every refresh
(`routing.rule=random`, no attribution). What training the embeddings is worth:
`trelm_frozen_embeddings`, the embeddings frozen, the tied MLM decoder (the word embedding matrix,
against which every object prediction is scored) among them, as `trelm` did before 2026-11-27 (the
runs that made the embeddings the default named the other side `trelm_embeddings`). Whether the
slices want another rate than the embeddings they now train beside: `trelm_slice_lr2`, the slices
at twice the variant's rate (`optim.slice_lr_scale=2`; the s11 sweep moved both together, and 2e-3
crossed first but levelled off lower). Where trelm's held-out gap to `kmb_only` sits: `frozen_dense`,
`kmb_only` with attention and layer norms frozen (every FFN whole, no routing), so beside `kmb_only`
at one rate it measures what training attention is worth, and beside `trelm` what the FFN neurons
off the paths are."""


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset of the suite: how it is built, and the budget of its runs."""
    cache: str
    """Directory name under data_cache/."""
    source: str
    build_args: dict
    batch_size: int
    budget_s: float
    """Seconds of step time per seed run."""
    sweep_s: float
    """Seconds of step time per learning-rate sweep run."""
    evals: int
    """Evaluations per seed run after the start (every budget_s / evals of a variant's clock)."""
    valid_sequences: int
    """Sequences of the valid split in the validation MLM loss."""
    warmup: dict = field(default_factory=dict)
    """WarmupConfig fields that differ from its defaults."""
    shape: str | None = None
    """None: the bundled pre-trained MiniLM; a `workload.SHAPES` name: a random-init model of that
    shape with MiniLM's tokenizer (--quick's smoke run), exported once to data_cache/bench-model-<shape>."""


DATASETS = {
    "wiki-geo": DatasetPlan("bench-wiki-geo", "wiki-geo", {"seq_len": 128}, batch_size=8, budget_s=50.0,
                            sweep_s=15.0, evals=4, valid_sequences=32),
    "small": DatasetPlan("bench-synthetic-small", "synthetic", {"size": "small", "seq_len": 64}, batch_size=16,
                         budget_s=50.0, sweep_s=15.0, evals=4, valid_sequences=64),
}
QUICK = {
    "tiny": DatasetPlan("bench-synthetic-tiny-64", "synthetic", {"size": "tiny", "seq_len": 64}, batch_size=4,
                        budget_s=0.2, sweep_s=0.02, evals=1, valid_sequences=4,
                        warmup={"steps": 2, "batch_size": 4, "valid_batches": 1}, shape="tiny"),
}
QUICK_SEEDS = (0, 1)


def base_model(plan: DatasetPlan, data_dir: Path) -> str:
    """The model the warm-up starts from: "minilm", or the exported random-init model of plan.shape."""
    import workload

    if plan.shape is None:
        return "minilm"
    out = workload.ROOT / "data_cache" / f"bench-model-{plan.shape}"
    if not (out / "config.json").is_file():
        build_mlm, export_pretrained = require("trelm_fast.model", "build_mlm"), require("trelm_fast.checkpoint",
                                                                                          "export_pretrained")
        load_tokenizer = require("trelm_fast.data.base_model", "load_tokenizer")
        cfg = workload.config(plan.shape, "dense", data_dir)
        torch.manual_seed(0)
        export_pretrained(build_mlm(cfg.model), out, load_tokenizer())
    return str(out)


def cache_name(plan: DatasetPlan, data: dict) -> str:
    """The directory name of `plan`'s dataset with the build options `data` changed:
    <plan.cache>[-<option>-<value>...]."""
    return "-".join([plan.cache, *(f"{k}-{v}" for k, v in sorted(data.items()))])


def dataset(plan: DatasetPlan, data: dict) -> Path:
    """The dataset directory of `plan` with the build options `data` changed, built on first use
    (data_cache/`cache_name`)."""
    import json

    import workload

    ensure_dataset, Dist = require("trelm_fast.train", "ensure_dataset", "Dist")
    build_args = {**plan.build_args, **data, "quiet": True}
    cfg = workload.config(None, "dense", workload.ROOT / "data_cache" / cache_name(plan, data),
                          [f"data.source={plan.source}", "data.build=true", f"data.build_args={json.dumps(build_args)}"])
    with contextlib.redirect_stdout(sys.stderr):  # the build prints its summary; results go to DIR
        return ensure_dataset(cfg, Dist(0, 1, torch.device("cpu")))


def warm_start(plan: DatasetPlan, data_dir: Path, log) -> tuple[Path, dict]:
    """(warmed-up model dir, its warmup.json) on the dataset, built on first use."""
    import json

    import workload

    WarmupConfig, warm_up_head, REPORT = require("trelm_fast.warmup", "WarmupConfig", "warm_up_head", "REPORT")
    warm = warm_up_head(base_model(plan, data_dir), data_dir, workload.ROOT / "data_cache" / "warm",
                        WarmupConfig(**plan.warmup), log=log)
    return warm, json.loads((warm / REPORT).read_text())


class Evaluator:
    """Macro P@1 on every probe split and validation MLM loss of a model, on fixed inputs.

    `probe_sample`: at most this many facts per split, every k-th fact in file order (None: all)."""

    def __init__(self, cfg, data_dir: Path, device: torch.device, valid_sequences: int, probe_sample: int | None):
        load_probe_splits, TrelmDataset, MLMCollator = require("trelm_fast.data.loader", "load_probe_splits",
                                                               "TrelmDataset", "MLMCollator")
        load_tokenizer = require("trelm_fast.data.base_model", "load_tokenizer")
        resolve_model_path = require("trelm_fast.config", "resolve_model_path")
        labelled_flat = require("trelm_fast.losses", "labelled_flat")
        self.evaluate_probes = require("trelm_fast.probe", "evaluate_probes")
        self.splits = {split: facts[::-(-len(facts) // probe_sample)] if probe_sample else facts
                       for split, facts in load_probe_splits(data_dir).items()}
        self.tokenizer = load_tokenizer(str(resolve_model_path(cfg.model.path)))
        valid = TrelmDataset(data_dir, "valid")
        collate = MLMCollator(valid.manifest, seed=0, mlm_prob=cfg.data.mlm_probability)
        batch = collate([valid[i] for i in range(min(valid_sequences, len(valid)))])
        self.valid = []  # chunks of 16 sequences: (input_ids, attention_mask, flat labelled positions, labels)
        for i in range(0, batch["input_ids"].shape[0], 16):
            positions, targets = labelled_flat(batch["mlm_labels"][i:i + 16])
            if targets.numel():
                self.valid.append(tuple(t.to(device) for t in (batch["input_ids"][i:i + 16],
                                                                batch["attention_mask"][i:i + 16], positions, targets)))
        self.device = device

    @torch.no_grad()
    def valid_loss(self, mlm) -> float:
        """Mean cross-entropy over the masked positions of the fixed valid subset (eval mode), the
        stock HF MLM loss computed at the labelled positions only (`losses.mlm_loss_at`)."""
        MLMHead, mlm_loss_at = require("trelm_fast.losses", "MLMHead", "mlm_loss_at")
        head, base = MLMHead.from_model(mlm), getattr(mlm, mlm.base_model_prefix)
        was_training = mlm.training
        mlm.eval()
        total = labelled = 0.0
        for input_ids, attention_mask, positions, targets in self.valid:
            hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            total += float(mlm_loss_at(hidden, positions, targets, head)) * targets.numel()
            labelled += targets.numel()
        mlm.train(was_training)
        return total / labelled

    def relation_prior(self) -> dict[str, float]:
        """Macro P@1 per split of answering each relation's most common stated object (`probe.relation_prior`):
        a P@1 not above it shows the common answers learned, not the facts."""
        relation_prior = require("trelm_fast.probe", "relation_prior")
        return {split: relation_prior(self.splits["stated"], facts, self.tokenizer).macro_p_at_1
                for split, facts in self.splits.items()}

    def __call__(self, mlm) -> dict[str, float]:
        figures = {f"p_at_1_{split}": self.evaluate_probes(mlm, self.tokenizer, facts, device=self.device).macro_p_at_1
                   for split, facts in self.splits.items()}
        return {**figures, "valid_mlm_loss": self.valid_loss(mlm)}


class Run:
    """One variant's training from the common start: advance() makes one step (and evaluates when due)."""

    def __init__(self, cfg, data_dir: Path, device: torch.device, start: dict, evaluate: Evaluator | None,
                 budget_s: float, evals: int):
        """`start`: the common start's state dicts ("mlm", "injection") and its figures ("figures",
        the curve's first point when `evaluate` is given)."""
        build_step_model, make_step = require("trelm_fast.step", "build_step_model", "make_step")
        batches, Dist = require("trelm_fast.train", "batches", "Dist")
        torch.manual_seed(cfg.seed)
        self.model = build_step_model(cfg.method.name, cfg, data_dir, device=device)
        self.model.mlm.load_state_dict(start["mlm"])
        self.model.injection.load_state_dict(start["injection"])
        self.step = make_step(cfg.method.name, self.model, cfg)
        self.data = batches(cfg, data_dir, Dist(0, 1, device), 0, 0)
        self.evaluate, self.budget_s, self.every_s = evaluate, budget_s, budget_s / max(evals, 1)
        self.curve: dict[str, list[float]] = {"loss_wall_s": [], "loss": [], "probe_wall_s": []}
        self.clock, self.steps, self.next_eval = 0.0, 0, self.every_s
        if evaluate is not None:
            self._record(start["figures"])

    @property
    def done(self) -> bool:
        return self.clock >= self.budget_s

    def _record(self, figures: dict[str, float]) -> None:
        self.curve["probe_wall_s"].append(self.clock)
        for key, value in figures.items():
            self.curve.setdefault(key, []).append(value)

    def advance(self) -> None:
        epoch, _, batch = next(self.data)
        t0 = time.perf_counter()
        result = self.step.step(batch, self.steps, epoch=float(epoch))
        loss = float(result.mlm_loss)  # waits for the device: the step's work belongs to its time
        self.clock += time.perf_counter() - t0
        self.steps += 1
        self.curve["loss_wall_s"].append(self.clock)
        self.curve["loss"].append(loss)
        if self.evaluate is not None and (self.clock >= self.next_eval or self.done):
            self._record(self.evaluate(self.model.mlm))
            while self.next_eval <= self.clock:
                self.next_eval += self.every_s


def lr_warmup_steps(budget_s: float, step_s: float) -> int:
    """Warm-up steps that take `LR_WARMUP_SHARE` of a `budget_s` run at `step_s` seconds per step (>= 1)."""
    return max(1, round(LR_WARMUP_SHARE * budget_s / step_s))


def run_in_turns(runs: dict, after_eval=None) -> None:
    """Advance every run one step at a time, in turns, until each is done.

    `after_eval(key, run)`, if given, is called once per evaluation on a run's curve as it is made:
    first for a run evaluated at the common start (recorded when a `Run` is built), then after each
    `advance()` that added one."""
    if after_eval is not None:
        for key, r in runs.items():
            if r.curve["probe_wall_s"]:
                after_eval(key, r)
    while any(not r.done for r in runs.values()):
        for key, r in runs.items():
            if not r.done:
                evaluations = len(r.curve["probe_wall_s"])
                r.advance()
                if after_eval is not None and len(r.curve["probe_wall_s"]) > evaluations:
                    after_eval(key, r)


def target_of(values: list[float], lower_is_better: bool) -> float:
    """80% of a curve's improvement from its start to its best value (inf / -inf: no improvement)."""
    if lower_is_better:
        low = min(values)
        return values[0] - FRACTION * (values[0] - low) if low < values[0] else float("-inf")
    best = max(values)
    return values[0] + FRACTION * (best - values[0]) if best > values[0] else float("inf")


def targets_from(curve: dict) -> dict[str, float]:
    """`target_of` dense's curve, per measure."""
    return {measure: target_of(curve[key], key == "valid_mlm_loss") for measure, key in MEASURES.items()}


def first_reached(curve: dict, targets: dict[str, float]) -> dict[str, float | None]:
    """The clock at the first evaluation meeting each target, or None."""
    out = {}
    for measure, key in MEASURES.items():
        better = (lambda v, t: v <= t) if key == "valid_mlm_loss" else (lambda v, t: v >= t)
        out[measure] = next((w for w, v in zip(curve["probe_wall_s"], curve[key]) if better(v, targets[measure])), None)
    return out


def spread(values: list[float]) -> dict:
    """{"value": median, "min", "max", "seeds"} of per-seed figures (tags of a record)."""
    return {"value": statistics.median(values), "min": str(float(min(values))), "max": str(float(max(values))),
            "seeds": str(len(values))}


class DatasetRun:
    """The sweep and the seed runs of every variant on one dataset."""

    def __init__(self, name: str, plan: DatasetPlan, variants: dict[str, Variant], seeds: tuple[int, ...],
                 settings: Settings, results: Results):
        import workload

        self.name, self.plan, self.variants, self.seeds = name, plan, variants, seeds
        self.settings, self.results = settings, results
        log = lambda m: print(f"[convergence] {name}: {m}", file=sys.stderr, flush=True)  # noqa: E731
        self.log = log
        if settings.start_pack is None:
            self.data_dir = dataset(plan, {})
            self.warm, warmup_report = warm_start(plan, self.data_dir, log)
            self.data_dirs = {v: dataset(plan, variant.data) if variant.data else self.data_dir
                              for v, variant in variants.items()}
        else:  # a machine that cannot build them (benchmarks/start_pack.py)
            from start_pack import open_pack

            pack = open_pack(settings.start_pack, name)
            self.data_dir, self.warm, warmup_report = pack.dataset(cache_name(plan, {})), pack.start, pack.report
            self.data_dirs = {v: pack.dataset(cache_name(plan, variant.data)) for v, variant in variants.items()}
            results.note(SUITE, f"{name}: from the start pack {settings.start_pack / name} (no build): the "
                                f"warm-up's weights rounded to {pack.report['pack']['weights']} (largest change "
                                f"{pack.report['pack']['max_abs_change']:.1e})")
        self.step_s: dict[str, float] = {}  # variant -> measured seconds per step (`calibrate`)
        self.evaluate = Evaluator(self.config("dense", 1e-4, 0), self.data_dir, settings.device,
                                  plan.valid_sequences, settings.probe_sample)
        before, after = warmup_report["before"], warmup_report["after"]
        model = "MiniLM" if plan.shape is None else f"random-init {plan.shape} model"
        results.note(SUITE, f"{name}: common start = {model} + MLM-head warm-up ({self.warm.name}, "
                            f"{warmup_report['settings']['steps']} steps, {warmup_report['seconds']:.0f} s, cached): "
                            f"valid MLM loss {before['valid_mlm_loss']:.3f} -> {after['valid_mlm_loss']:.3f}, probe P@1 "
                            + ", ".join(f"{s} {before['probes'][s]:.3f} -> {after['probes'][s]:.3f}"
                                        for s in after["probes"]))
        results.note(SUITE, f"{name}: probes " + ", ".join(f"{split} {len(facts)} facts"
                                                           for split, facts in self.evaluate.splits.items())
                     + (f" (REDUCED: every k-th fact, at most {settings.probe_sample} per split, --probe-sample)"
                        if settings.probe_sample else "")
                     + "; P@1 of answering each relation's most common stated object: "
                     + ", ".join(f"{split} {p:.3f}" for split, p in self.evaluate.relation_prior().items()))

    def config(self, variant: str, lr: float, seed: int, budget_s: float | None = None):
        """The trainer config of one run: constant `lr` after a warm-up of `LR_WARMUP_SHARE` of
        `budget_s` at the variant's calibrated step time (None: 1 step, the calibration itself), with
        the settings' `train.static_shapes` and `train.cuda_graphs` (the same for every variant)."""
        import workload

        warmup = 1 if budget_s is None else lr_warmup_steps(budget_s, self.step_s[variant])
        return workload.config(None, self.variants[variant].method, self.data_dirs[variant], [
            f"model.path={self.warm}", "model.init=pretrained", f"train.batch_size={self.plan.batch_size}",
            "train.steps=1000000", "schedule.kind=constant", f"schedule.warmup_steps={warmup}", f"optim.lr={lr}",
            f"seed={seed}", f"train.static_shapes={self.settings.static_shapes}",
            f"train.cuda_graphs={str(self.settings.cuda_graphs).lower()}", *self.variants[variant].overrides])

    def calibrate(self, start: dict) -> None:
        """Measure each variant's seconds per step (median of the timed calibration steps)."""
        for vname, variant in self.variants.items():
            run = Run(self.config(vname, statistics.median(variant.lrs), 0), self.data_dirs[vname],
                      self.settings.device, start, None, float("inf"), 0)
            for _ in range(CALIBRATION_STEPS):
                run.advance()
            clocks = run.curve["loss_wall_s"]
            self.step_s[vname] = statistics.median(b - a for a, b in zip(clocks, clocks[1:]))
        self.results.note(SUITE, f"{self.name}: step time (calibration, median of {CALIBRATION_STEPS - 1} steps) "
                          + ", ".join(f"{v} {s:.2f} s" for v, s in self.step_s.items())
                          + f"; learning-rate warm-up {LR_WARMUP_SHARE:.0%} of each run's budget: "
                          + ", ".join(f"{v} {lr_warmup_steps(self.plan.budget_s, s)}" for v, s in self.step_s.items())
                          + " steps in a seed run")

    def start(self, seed: int) -> dict:
        """The common start of one seed: the warmed-up MLM and the knowledge projection's init, and
        its figures (evaluated once, the first point of every curve of the seed)."""
        build_step_model = require("trelm_fast.step", "build_step_model")
        torch.manual_seed(seed)
        reference = build_step_model("dense", self.config("dense", 1e-4, seed), self.data_dir,
                                     device=self.settings.device)
        return {"mlm": reference.mlm.state_dict(), "injection": reference.injection.state_dict(),
                "figures": self.evaluate(reference.mlm)}

    def sweep(self) -> dict[str, float]:
        """{variant: chosen lr}: each variant's rates in turns on seed 0, lowest final valid MLM loss."""
        start, chosen = self.start(0), {}
        self.calibrate(start)
        self.results.note(SUITE, f"{self.name}: valid MLM loss of the common start "
                                 f"{start['figures']['valid_mlm_loss']:.3f}")
        for vname, variant in self.variants.items():
            runs = {lr: Run(self.config(vname, lr, 0, self.plan.sweep_s), self.data_dirs[vname],
                            self.settings.device, start, None, self.plan.sweep_s, 0) for lr in variant.lrs}
            run_in_turns(runs)
            losses = {lr: self.evaluate.valid_loss(r.model.mlm) for lr, r in runs.items()}
            chosen[vname] = min(losses, key=losses.get)
            for lr, loss in losses.items():
                self.results.add(SUITE, f"{self.name}/sweep lr={lr:g}", vname, "final_loss", loss)
            self.results.note(SUITE, f"{self.name}: {vname} ({variant.describe()}) sweep, valid MLM loss after "
                                     f"{self.plan.sweep_s:.0f} s: " + ", ".join(
                                         f"lr {lr:g} {loss:.3f} ({runs[lr].steps} steps)" for lr, loss in losses.items())
                                     + f"; chosen {chosen[vname]:g}"
                                     + (" (an end of the grid)" if chosen[vname] in (min(variant.lrs), max(variant.lrs)) else ""))
            self.log(f"sweep {vname}: {losses} -> {chosen[vname]:g}")
        return chosen

    def seed_runs(self, chosen: dict[str, float]) -> dict[str, list["Run"]]:
        """{variant: [Run per seed]} at the chosen rates, the variants of a seed in turns."""
        out: dict[str, list[Run]] = {v: [] for v in self.variants}
        for seed in self.seeds:
            start = self.start(seed)
            runs = {v: Run(self.config(v, chosen[v], seed, self.plan.budget_s), self.data_dirs[v], self.settings.device, start,
                           self.evaluate, self.plan.budget_s, self.plan.evals) for v in self.variants}
            run_in_turns(runs)
            for v, r in runs.items():
                out[v].append(r)
                self.results.curves[f"{self.name}/{v}/seed{seed}"] = r.curve
                del r.model, r.step, r.data  # free the memory: only the curve stays
            self.log(f"seed {seed} done")
        return out

    def report(self, chosen: dict[str, float], runs: dict[str, list["Run"]]) -> None:
        targets = [targets_from(r.curve) for r in runs["dense"]]
        for v, seed_runs in runs.items():
            reached: dict[str, list[float]] = {m: [] for m in MEASURES}
            for r, target in zip(seed_runs, targets):
                for measure, clock in first_reached(r.curve, target).items():
                    if clock is not None:
                        reached[measure].append(clock)
            for measure, key in MEASURES.items():
                metric = "final_loss" if key == "valid_mlm_loss" else "final_p_at_1"
                final = spread([r.curve[key][-1] for r in seed_runs])
                self.results.add(SUITE, f"{self.name}/{measure}", v, metric, final.pop("value"), **final)
                if reached[measure]:
                    times = spread(reached[measure])
                    self.results.add(SUITE, f"{self.name}/{measure}", v, "time_to_target_s", times.pop("value"),
                                     **times)
            steps = [r.steps for r in seed_runs]
            s_per_step = statistics.median(r.clock / r.steps for r in seed_runs)
            missed = {m: len(seed_runs) - len(t) for m, t in reached.items() if len(t) < len(seed_runs)}
            not_reached = ", ".join(f"{m} ({n} of {len(seed_runs)} seeds)" for m, n in missed.items())
            self.results.note(SUITE, f"{self.name}: {v} ({self.variants[v].describe()}) lr {chosen[v]:g}: "
                                     f"{min(steps)}-{max(steps)} steps, {s_per_step:.2f} s/step"
                                     + (f"; target not reached in {not_reached}" if missed else ""))
        t = statistics.median
        self.results.note(SUITE, f"{self.name}: targets from dense's own curve per seed ({FRACTION:.0%} of its "
                                 "improvement), median over seeds: " + ", ".join(
                                     f"{m} {t(x[m] for x in targets):.3f}" for m in MEASURES)
                                 + " (inf / -inf: dense did not improve, no target)")

    def run(self) -> None:
        chosen = self.sweep()
        self.report(chosen, self.seed_runs(chosen))


def scaled(plan: DatasetPlan, scale: float) -> DatasetPlan:
    """The plan with its step-time budgets multiplied by `scale` (--budget-scale: a reduced run)."""
    return replace(plan, budget_s=plan.budget_s * scale, sweep_s=plan.sweep_s * scale)


def selected_variants(dataset: str, settings: Settings) -> dict[str, Variant]:
    """The variants whose `<dataset>/<variant>` matches --case (all without it), with dense whenever
    any is selected (the targets come from its curve); {} when none is."""
    wanted = {v: x for v, x in ALL_VARIANTS.items() if settings.wants(f"{dataset}/{v}")}
    return {"dense": VARIANTS["dense"], **wanted} if wanted else {}


def run(settings: Settings, results: Results) -> None:
    plans, seeds = (QUICK, QUICK_SEEDS) if settings.quick else (DATASETS, SEEDS)
    plans = {name: scaled(plan, settings.budget_scale) for name, plan in plans.items()}
    if settings.budget_scale != 1.0:
        results.note(SUITE, f"REDUCED run: every step-time budget x {settings.budget_scale:g} (--budget-scale)")
    for name, plan in plans.items():
        variants = selected_variants(name, settings)
        if variants:
            DatasetRun(name, plan, variants, seeds, settings, results).run()
        results.note(SUITE, f"{name}: batch {plan.batch_size}, sweep {plan.sweep_s:g} s and seed runs "
                            f"{plan.budget_s:g} s of step time per run, {plan.evals} evaluations per seed run, "
                            f"seeds {', '.join(map(str, seeds))}, constant learning rate after a warm-up of "
                            f"{LR_WARMUP_SHARE:.0%} of each run's step-time budget")
