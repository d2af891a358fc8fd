"""`convergence` suite: wall-clock to a quality target, dense vs TRELM and the paper's figure-6 variants.

Variants and the trainer methods they run: `dense` (`--method dense`), `trelm` (`--method trelm`),
`kmb_only` (`no_routing`: memory bank without knowledge routing) and `routing_only` (`no_kmb`:
routing without the bank), as "each module used independently" in the paper's section 4.7.

Every variant starts from the same weights (the dense model's initial state is loaded into each)
and reads the same batches in the same order: the trainer's own data iterator
(`trelm_fast.train.batches`) over the benchmark dataset, its step objects (`build_step_model`,
`make_step`) and its probe evaluation (`trelm_fast.probe.evaluate_probes`, macro P@1 on the
dataset's stated facts). The model is the embedded default's (a small random-init BERT with the
MiniLM vocabulary). The clock counts step time only (not data loading or evaluation).

Targets: `dense` runs first for its whole budget; each target is 80% of the improvement dense made
from the common start: P@1 >= p0 + 0.8 (best - p0), validation MLM loss <= l0 - 0.8 (l0 - lowest)
(stock HF MLM loss on the valid split, fixed masking). Where dense did not improve a measure there
is no target for it. The other variants run until they reach both targets or their budget is spent. time_to_target_s is the clock at the first evaluation meeting a target (case
`p_at_1` or `mlm_loss`); a variant that never meets it gets no record, and the note says so.
"""
from __future__ import annotations

import time

import torch

from harness import Results, Settings, require

SUITE = "convergence"
VARIANTS = {"dense": "dense", "trelm": "trelm", "kmb_only": "no_routing", "routing_only": "no_kmb"}
FRACTION = 0.8


def _budget(settings: Settings) -> dict:
    if settings.quick:
        return {"batch_size": 8, "max_steps": 6, "eval_every": 3, "budget_s": 8.0}
    return {"batch_size": 16, "max_steps": 400, "eval_every": 20, "budget_s": 120.0}


class Evaluator:
    """Probe macro P@1 (stated facts) and validation MLM loss of a model, on fixed inputs."""

    def __init__(self, cfg, data_dir, device: torch.device):
        load_probes, TrelmDataset, MLMCollator = require("trelm_fast.data.loader", "load_probes", "TrelmDataset",
                                                         "MLMCollator")
        load_tokenizer = require("trelm_fast.data.base_model", "load_tokenizer")
        resolve_model_path = require("trelm_fast.config", "resolve_model_path")
        self.evaluate_probes = require("trelm_fast.probe", "evaluate_probes")
        self.facts = load_probes(data_dir, "stated")
        self.tokenizer = load_tokenizer(str(resolve_model_path(cfg.model.path)))
        valid = TrelmDataset(data_dir, "valid")
        collate = MLMCollator(valid.manifest, seed=cfg.seed, mlm_prob=cfg.data.mlm_probability)
        self.valid = {k: v.to(device) for k, v in collate([valid[i] for i in range(len(valid))]).items()}
        self.device = device

    @torch.no_grad()
    def __call__(self, model) -> tuple[float, float]:
        p_at_1 = self.evaluate_probes(model.mlm, self.tokenizer, self.facts, device=self.device).macro_p_at_1
        was_training = model.mlm.training
        model.mlm.eval()
        loss = model.mlm(input_ids=self.valid["input_ids"], attention_mask=self.valid["attention_mask"],
                         labels=self.valid["mlm_labels"]).loss.item()
        model.mlm.train(was_training)
        return p_at_1, loss


def train_variant(variant: str, cfg, data_dir, device: torch.device, start: dict, evaluate: Evaluator,
                  plan: dict, targets: dict | None) -> dict:
    """Train one variant from `start`; returns its curves and the clock at each target (or None)."""
    build_step_model, make_step = require("trelm_fast.step", "build_step_model", "make_step")
    batches, Dist = require("trelm_fast.train", "batches", "Dist")
    torch.manual_seed(cfg.seed)
    model = build_step_model(cfg.method.name, cfg, data_dir).to(device)
    model.mlm.load_state_dict(start["mlm"])
    model.injection.load_state_dict(start["injection"])
    step = make_step(cfg.method.name, model, cfg)
    data = batches(cfg, data_dir, Dist(0, 1, device), 0, 0)
    curve = {"loss_wall_s": [], "loss": [], "probe_wall_s": [], "p_at_1": [], "valid_mlm_loss": []}
    reached: dict[str, float | None] = {"p_at_1": None, "mlm_loss": None}
    clock = 0.0

    def evaluate_now():
        p_at_1, loss = evaluate(model)
        curve["probe_wall_s"].append(clock)
        curve["p_at_1"].append(p_at_1)
        curve["valid_mlm_loss"].append(loss)
        if targets is not None:
            if reached["p_at_1"] is None and p_at_1 >= targets["p_at_1"]:
                reached["p_at_1"] = clock
            if reached["mlm_loss"] is None and loss <= targets["mlm_loss"]:
                reached["mlm_loss"] = clock

    evaluate_now()
    for i in range(plan["max_steps"]):
        epoch, _, batch = next(data)
        t0 = time.perf_counter()
        result = step.step(batch, i, epoch=float(epoch))
        clock += time.perf_counter() - t0
        curve["loss_wall_s"].append(clock)
        curve["loss"].append(result.mlm_loss)
        if (i + 1) % plan["eval_every"] == 0 or i + 1 == plan["max_steps"] or clock >= plan["budget_s"]:
            evaluate_now()
            if clock >= plan["budget_s"] or (targets is not None and None not in reached.values()):
                break
    return {"curve": curve, "reached": reached, "steps": i + 1, "clock": clock}


def run(settings: Settings, results: Results) -> None:
    import workload

    plan = _budget(settings)
    data_dir = workload.dataset_dir()
    overrides = [f"train.batch_size={plan['batch_size']}", f"train.steps={plan['max_steps']}"]
    configs = {v: workload.config(None, method, data_dir, overrides) for v, method in VARIANTS.items()}
    build_step_model = require("trelm_fast.step", "build_step_model")
    torch.manual_seed(configs["dense"].seed)
    reference = build_step_model("dense", configs["dense"], data_dir)
    start = {"mlm": reference.mlm.state_dict(), "injection": reference.injection.state_dict()}
    evaluate = Evaluator(configs["dense"], data_dir, settings.device)

    runs = {"dense": train_variant("dense", configs["dense"], data_dir, settings.device, start, evaluate, plan, None)}
    curve = runs["dense"]["curve"]
    targets = {"p_at_1": float("inf"), "mlm_loss": float("-inf")}  # unreachable unless dense improved
    p0, l0 = curve["p_at_1"][0], curve["valid_mlm_loss"][0]
    if max(curve["p_at_1"]) > p0:
        targets["p_at_1"] = p0 + FRACTION * (max(curve["p_at_1"]) - p0)
    if min(curve["valid_mlm_loss"]) < l0:
        targets["mlm_loss"] = l0 - FRACTION * (l0 - min(curve["valid_mlm_loss"]))
    runs["dense"]["reached"] = {
        "p_at_1": next((t for t, p in zip(curve["probe_wall_s"], curve["p_at_1"]) if p >= targets["p_at_1"]), None),
        "mlm_loss": next((t for t, l in zip(curve["probe_wall_s"], curve["valid_mlm_loss"]) if l <= targets["mlm_loss"]), None),
    }
    for variant in ("trelm", "kmb_only", "routing_only"):
        runs[variant] = train_variant(variant, configs[variant], data_dir, settings.device, start, evaluate, plan, targets)

    for variant, run_ in runs.items():
        c = run_["curve"]
        results.curves[variant] = c
        results.add(SUITE, "final", variant, "final_loss", c["valid_mlm_loss"][-1])
        results.add(SUITE, "final", variant, "final_p_at_1", c["p_at_1"][-1])
        missed = []
        for case, clock in run_["reached"].items():
            if clock is None:
                missed.append(case)
            else:
                results.add(SUITE, case, variant, "time_to_target_s", clock)
        results.note(SUITE, f"{variant} ({VARIANTS[variant]}): {run_['steps']} steps in {run_['clock']:.1f} s of step time; "
                            f"best P@1 {max(c['p_at_1']):.3f}, lowest valid MLM loss {min(c['valid_mlm_loss']):.3f}"
                            + (f"; target not reached: {', '.join(missed)}" if missed else ""))
    results.note(SUITE, f"targets ({FRACTION:.0%} of dense's improvement from the common start): P@1 >= "
                        f"{targets['p_at_1']:.3f}, valid MLM loss <= {targets['mlm_loss']:.3f} (inf: dense did "
                        f"not improve it, no target); budget {plan['budget_s']:.0f} s of "
                        f"step time or {plan['max_steps']} steps per variant, batch {plan['batch_size']}, evaluation "
                        f"every {plan['eval_every']} steps; embedded default model, benchmark dataset")
