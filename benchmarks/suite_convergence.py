"""`convergence` suite: wall-clock to a quality target, dense vs TRELM and the paper's figure-6 variants.

Variants and the trainer methods they run: `dense` (`--method dense`), `trelm` (`--method trelm`),
`kmb_only` (`no_routing`: memory bank without knowledge routing) and `routing_only` (`no_kmb`:
routing without the bank), as "each module used independently" in the paper's section 4.7.

Every variant starts from the same weights (the dense model's initial state is loaded into each)
and reads the same batches in the same order: the trainer's own data iterator
(`trelm_fast.train.batches`) over the benchmark dataset, its step objects (`build_step_model`,
`make_step`) and its probe evaluation (`trelm_fast.probe.evaluate_probes`, macro P@1 on the
dataset's stated facts). The full run starts from the pre-trained MiniLM encoder (the paper
continues pre-training from a pre-trained LM; TRELM freezes most of the encoder, which a random
init cannot afford); --quick uses the embedded default's small random-init model as a smoke run.

The variants advance in turns, one step each, each with its own clock that counts its step time
only (not data loading or evaluation), so a change in the load of a shared machine hits them
alike. Each runs until its clock passes the budget or it has made `max_steps` steps.

Targets, from dense's run: 80% of the improvement dense made from the common start, P@1 >= p0 +
0.8 (best - p0) and validation MLM loss <= l0 - 0.8 (l0 - lowest) (stock HF MLM loss on the valid
split, fixed masking); where dense did not improve a measure there is no target for it.
time_to_target_s is a variant's clock at its first evaluation meeting the target (case `p_at_1` or
`mlm_loss`); a variant that never meets it gets no record, and the note says so.
"""
from __future__ import annotations

import time

import torch

from harness import Results, Settings, require

SUITE = "convergence"
VARIANTS = {"dense": "dense", "trelm": "trelm", "kmb_only": "no_routing", "routing_only": "no_kmb"}
FRACTION = 0.8
PRETRAINED = ["model.init=pretrained", "model.hidden_size=null", "model.num_layers=null", "model.num_heads=null",
              "model.intermediate_size=null", "model.max_position_embeddings=null", "model.dropout=null"]


def _plan(settings: Settings) -> dict:
    if settings.quick:
        return {"batch_size": 8, "max_steps": 6, "eval_every": 3, "budget_s": 8.0, "model": []}
    return {"batch_size": 16, "max_steps": 400, "eval_every": 10, "budget_s": 150.0, "model": PRETRAINED}


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
        batch = collate([valid[i] for i in range(len(valid))])
        self.valid = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "mlm_labels")}
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


class Run:
    """One variant's training from the common start: advance() makes one step (and evaluates when due)."""

    def __init__(self, cfg, data_dir, device: torch.device, start: dict, evaluate: Evaluator, plan: dict):
        build_step_model, make_step = require("trelm_fast.step", "build_step_model", "make_step")
        batches, Dist = require("trelm_fast.train", "batches", "Dist")
        torch.manual_seed(cfg.seed)
        self.model = build_step_model(cfg.method.name, cfg, data_dir, device=device)
        self.model.mlm.load_state_dict(start["mlm"])
        self.model.injection.load_state_dict(start["injection"])
        self.step = make_step(cfg.method.name, self.model, cfg)
        self.data = batches(cfg, data_dir, Dist(0, 1, device), 0, 0)
        self.evaluate, self.plan = evaluate, plan
        self.curve = {"loss_wall_s": [], "loss": [], "probe_wall_s": [], "p_at_1": [], "valid_mlm_loss": []}
        self.clock, self.steps = 0.0, 0
        self._evaluate()

    @property
    def done(self) -> bool:
        return self.clock >= self.plan["budget_s"] or self.steps >= self.plan["max_steps"]

    def _evaluate(self) -> None:
        p_at_1, loss = self.evaluate(self.model)
        self.curve["probe_wall_s"].append(self.clock)
        self.curve["p_at_1"].append(p_at_1)
        self.curve["valid_mlm_loss"].append(loss)

    def advance(self) -> None:
        epoch, _, batch = next(self.data)
        t0 = time.perf_counter()
        result = self.step.step(batch, self.steps, epoch=float(epoch))
        loss = float(result.mlm_loss)  # waits for the device: the step's work belongs to its time
        self.clock += time.perf_counter() - t0
        self.steps += 1
        self.curve["loss_wall_s"].append(self.clock)
        self.curve["loss"].append(loss)
        if self.steps % self.plan["eval_every"] == 0 or self.done:
            self._evaluate()


def targets_from(curve: dict) -> dict[str, float]:
    """80% of dense's improvement from the common start (inf / -inf: no improvement, no target)."""
    p0, l0 = curve["p_at_1"][0], curve["valid_mlm_loss"][0]
    best_p, low_l = max(curve["p_at_1"]), min(curve["valid_mlm_loss"])
    return {"p_at_1": p0 + FRACTION * (best_p - p0) if best_p > p0 else float("inf"),
            "mlm_loss": l0 - FRACTION * (l0 - low_l) if low_l < l0 else float("-inf")}


def first_reached(curve: dict, targets: dict[str, float]) -> dict[str, float | None]:
    """The clock at the first evaluation meeting each target, or None."""
    evals = list(zip(curve["probe_wall_s"], curve["p_at_1"], curve["valid_mlm_loss"]))
    return {"p_at_1": next((t for t, p, _ in evals if p >= targets["p_at_1"]), None),
            "mlm_loss": next((t for t, _, l in evals if l <= targets["mlm_loss"]), None)}


def run(settings: Settings, results: Results) -> None:
    import workload

    plan = _plan(settings)
    data_dir = workload.dataset_dir()
    overrides = [f"train.batch_size={plan['batch_size']}", f"train.steps={plan['max_steps']}", *plan["model"]]
    configs = {v: workload.config(None, method, data_dir, overrides) for v, method in VARIANTS.items()}
    build_step_model = require("trelm_fast.step", "build_step_model")
    torch.manual_seed(configs["dense"].seed)
    reference = build_step_model("dense", configs["dense"], data_dir)
    start = {"mlm": reference.mlm.state_dict(), "injection": reference.injection.state_dict()}
    evaluate = Evaluator(configs["dense"], data_dir, settings.device)
    runs = {v: Run(configs[v], data_dir, settings.device, start, evaluate, plan) for v in VARIANTS}
    while any(not r.done for r in runs.values()):
        for r in runs.values():
            if not r.done:
                r.advance()

    targets = targets_from(runs["dense"].curve)
    for variant, r in runs.items():
        c = r.curve
        results.curves[variant] = c
        results.add(SUITE, "final", variant, "final_loss", c["valid_mlm_loss"][-1])
        results.add(SUITE, "final", variant, "final_p_at_1", c["p_at_1"][-1])
        missed = []
        for case, clock in first_reached(c, targets).items():
            if clock is None:
                missed.append(case)
            else:
                results.add(SUITE, case, variant, "time_to_target_s", clock)
        results.note(SUITE, f"{variant} ({VARIANTS[variant]}): {r.steps} steps in {r.clock:.1f} s of step time; "
                            f"P@1 {c['p_at_1'][0]:.3f} -> best {max(c['p_at_1']):.3f}, valid MLM loss "
                            f"{c['valid_mlm_loss'][0]:.3f} -> lowest {min(c['valid_mlm_loss']):.3f}"
                            + (f"; target not reached: {', '.join(missed)}" if missed else ""))
    model = "pre-trained MiniLM" if plan["model"] else "the embedded default's small random-init model"
    results.note(SUITE, f"targets ({FRACTION:.0%} of dense's improvement from the common start): P@1 >= "
                        f"{targets['p_at_1']:.3f}, valid MLM loss <= {targets['mlm_loss']:.3f} (inf: no "
                        f"improvement, no target); budget {plan['budget_s']:.0f} s of step time or "
                        f"{plan['max_steps']} steps per variant, variants interleaved step by step, batch "
                        f"{plan['batch_size']}, evaluation every {plan['eval_every']} steps; {model}, "
                        "benchmark dataset")
