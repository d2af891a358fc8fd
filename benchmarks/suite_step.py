"""`step` suite: one training step (forward, backward, optimizer) of each DESIGN.md section 3 variant.

Cases `minilm` and `bert-base` (workload.SHAPES; --quick: `minilm` only, batch 2 x 128; `--shape`
selects others), batch 8 x 128 full-length sequences (workload.full_batch; `--batch-size`, `--seq-len`),
random init, the generated dataset (workload.generated_dir). Each variant is the trainer's own step
object (`trelm_fast.step.make_step`): `hf_dense`, `dense_opt`, `frozen_dense`, `trelm_naive`,
`trelm_fast` (`--variant` selects some, and runs the `DIAGNOSTICS`); they share every generic speed-up
(precision, fused AdamW, no host sync in a plain step), so `trelm_fast / dense_opt` measures the method
and `trelm_fast / frozen_dense` routing plus sparse FFN gradients alone. The precision is the trainer's
`train.precision` (`--precision`, default fp32); a case is named after its shape, with `-bf16` / `-fp16`
appended at those precisions. `--static-shapes` sets `train.static_shapes`; `--cuda-graphs` sets
`train.cuda_graphs` for every variant but `trelm_naive` (which stays eager) and appends `-graphs` to the
case: each plain step is then a CUDA-graph replay (on CPU, its eager rehearsal), the same engineering
for `dense_opt` as for `trelm_fast` (the warm-up runs come before the measured calls, the FLOPs are
counted and peak_mem_mb profiled on the capture, whose memory pool every replay reuses). Every record
carries `device` (the device's name), `precision` and the variant's wall-clock percentiles `p20_ms`,
`p50_ms`, `p80_ms` (amortized like wall_ms, which is p50).

Routed variants refresh their knowledge paths every R steps (`routing.refresh`), so their figures
are amortized: wall_ms = (median step without a refresh) + (attribution time) / R, and likewise
flops; `attribution_share` = (attribution time / R) / wall_ms. Under `--cuda-graphs` the graphs are
captured first (warm-up runs + 1 plain steps), then one more refresh is made and the same number of
plain steps after it are timed once: replays where the graphs survived the refresh (path sizes
unchanged, as under `top_fraction`), warm-up runs and a capture where it dropped them
(`GraphedStep.captures` says which; the note says whether they were kept). Their time beyond as
many replays is counted in the attribution time (one batch shape: in training each shape in use
is captured again after a refresh that drops the graphs). The first refresh (no paths yet)
counts the refresh step's FLOPs and profiles its memory; the attribution time is the median of the
step's own timer (`time/attribution_s`) over the `REFRESHES` (--quick: 2) refreshes that follow,
made with paths already set, as in training. peak_mem_mb is the larger of the refresh step's and
a plain step's. On CUDA, `back_to_back_ms` (amortized the same way) is the median time per plain step
over windows of `BACK_TO_BACK` steps with one device synchronize per window, as training runs them:
wall_ms ends every step with a synchronize, so it adds the host's preparation of a step to the GPU's
run of it, where back to back the host prepares a step while the GPU runs the one before (the batch
copied from page-locked memory: `trelm_fast.step.page_locked`). Non-finite losses are checked once,
after the timed steps (a check per step would be a host sync per step). `trelm_naive`'s per-layer,
per-sequence loop is linear in the sequences: outside `minilm` it is run on 1 sequence (`routing.sequences=1`) and
its time and FLOPs are multiplied by the number of sequences the configuration attributes (said in
the notes).
"""
from __future__ import annotations

import itertools
import statistics
import time

from harness import Results, Settings, _sync, count_and_profile, describe_device, measure_many, time_quantiles

SUITE = "step"
VARIANTS = ("hf_dense", "dense_opt", "frozen_dense", "trelm_naive", "trelm_fast")
DIAGNOSTICS = {"trelm_fast_frozen_embeddings": ("trelm_fast", ("method.trainable=[head,other]",))}
"""Step variants run only when `--variant` names them: name -> (the trainer's method, its config
overrides). `trelm_fast_frozen_embeddings`: `trelm_fast` with the embeddings (the tied MLM decoder
among them) frozen, the default before 2026-11-27, the convergence diagnostic
`trelm_frozen_embeddings`' step."""
REFRESHES = 3
"""Refreshes with paths set whose median attribution time is reported (--quick: 2)."""
BACK_TO_BACK = 10
"""Plain steps per window of the back-to-back timing (CUDA)."""
PHASES = ("forward_backward", "optimizer", "bank")
"""The step's own timers (`time/<phase>_s` in its stats; `other` = the rest of `time/step_s`:
negative sampling, moving the batch), reported as a breakdown in the notes. Host time: on CUDA the
launches, not the kernels."""


def _check_finite(step) -> None:
    if step.nonfinite_total:
        raise RuntimeError(f"{step.method}: {step.nonfinite_total} steps skipped for a non-finite loss; "
                           "the timing would not be of steps")


class Variant:
    """One step variant at one shape: the trainer's step object, its batch, and its refresh figures."""

    def __init__(self, settings: Settings, shape: str, name: str, data_dir, batch_size: int, seq_len: int):
        import workload

        self.name = name
        method, extra = DIAGNOSTICS.get(name, (name, ()))
        self.routing = workload.config(shape, method, data_dir, model_type=settings.model_type).routing  # as configured
        sequences = min(batch_size, self.routing.sequences or batch_size)
        self.naive_scaled = name == "trelm_naive" and shape != "minilm" and sequences > 1
        graphs = settings.cuda_graphs and name != "trelm_naive"  # the per-layer reference stays eager
        overrides = [f"model.dropout={settings.dropout}", f"train.precision={settings.precision}",
                     f"train.static_shapes={settings.static_shapes}", f"train.cuda_graphs={str(graphs).lower()}"]
        overrides += ["routing.sequences=1"] if self.naive_scaled else []
        self.step, self.model = workload.build_step(method, shape, data_dir, settings.device, [*overrides, *extra],
                                                    model_type=settings.model_type)
        self.batch = workload.full_batch(data_dir, batch_size, seq_len, causal=workload.is_causal(settings.model_type))
        self.routed = self.step.router is not None
        if self.routed and self.routing.refresh == 1:
            raise ValueError("step suite: routing.refresh = 1 leaves no step without a refresh to time")
        self.scale = sequences if self.naive_scaled else 1
        self.indices = (i for i in itertools.count(1) if not self.routed or i % self.routing.refresh)
        self.refresh = {}
        self.phases: dict[str, list[float]] = {}
        if self.routed:  # step 0 sets the paths (counted and profiled); then refreshes with paths set, timed
            flops, peak = count_and_profile(lambda: self.step(self.batch, 0), settings.device)
            count = 2 if settings.quick else REFRESHES
            times = [self.step(self.batch, k * self.routing.refresh).stats["time/attribution_s"]
                     for k in range(1, count + 1)]
            _check_finite(self.step)
            self.refresh = {"flops": flops, "peak_mem_mb": peak, "attribution_s": statistics.median(times),
                            "count": count}
        self.after_refresh_s, self.recaptured = 0.0, False
        if self.step.graphs is not None:
            graphs = self.step.graphs
            if self.routed:  # what a refresh costs the plain steps after it: replays, or a recapture
                for _ in range(graphs.warmup + 1):  # warm-up runs and the capture
                    self.step(self.batch, next(self.indices))
                self.step(self.batch, (self.refresh["count"] + 1) * self.routing.refresh)
                captures = graphs.captures
                _sync(settings.device)
                t0 = time.perf_counter()
                for _ in range(graphs.warmup + 1):
                    self.step(self.batch, next(self.indices))
                _sync(settings.device)
                self.after_refresh_s = time.perf_counter() - t0
                self.recaptured = graphs.captures > captures
                graphs.invalidate()
            for _ in range(graphs.warmup):  # the eager warm-up runs: the first measured call (FLOPs) captures
                self.step(self.batch, next(self.indices))

    def plain_step(self) -> None:
        """A step whose index is not a refresh step; keeps the step's own phase timers."""
        result = self.step(self.batch, next(self.indices))
        times = {phase: result.stats.get(f"time/{phase}_s", 0.0) for phase in PHASES}
        times["other"] = max(0.0, result.stats.get("time/step_s", 0.0) - sum(times.values()))
        for phase, t in times.items():
            self.phases.setdefault(phase, []).append(t)

    def breakdown(self) -> str:
        """Median share of each phase in a step without refresh (the step's own timers)."""
        med = {p: statistics.median(t) for p, t in self.phases.items()}
        total = sum(med.values())
        return ", ".join(f"{p} {v / total:.0%}" for p, v in med.items()) if total > 0 else ""

    def amortized(self, values: dict[str, float], tokens: int) -> tuple[dict[str, float], dict[str, float], str]:
        """Add the refresh cost / R to a plain step's figures; returns them, the percentile tags and a note."""
        quantiles = values.pop("quantiles_ms")
        note = f"step without refresh {values['wall_ms']:.0f} ms ({self.breakdown()})"
        attr_ms = 0.0
        if self.routed:
            attr_ms = self.refresh["attribution_s"] * 1e3 * self.scale / self.routing.refresh
            if self.after_refresh_s:  # beyond as many replays
                graphs, runs = self.step.graphs, self.step.graphs.warmup + 1
                extra_ms = max(0.0, self.after_refresh_s * 1e3 - runs * values["wall_ms"])
                kept = ("recaptured" if self.recaptured else "kept") if graphs.capture else "rehearsed, none captured"
                note += (f"; after a refresh (graphs {kept}) the {runs} plain steps took {extra_ms:.0f} ms "
                         f"beyond {runs} replays, amortized")
                attr_ms += extra_ms / self.routing.refresh
        tags = {f"p{q}_ms": t + attr_ms for q, t in zip((20, 50, 80), quantiles)}
        if "back_to_back_ms" in values:
            values["back_to_back_ms"] += attr_ms
        if not self.routed:
            return values, tags, note
        r, refresh = self.routing, self.routing.refresh
        values["flops"] += max(0.0, self.refresh["flops"] - values["flops"]) * self.scale / refresh
        values["wall_ms"] += attr_ms
        values["tokens_per_s"] = tokens / (values["wall_ms"] / 1e3)
        values["peak_mem_mb"] = max(values["peak_mem_mb"], self.refresh["peak_mem_mb"])
        values["attribution_share"] = attr_ms / values["wall_ms"]
        note = (f"attribution {self.refresh['attribution_s']:.2f} s per refresh (median of "
                f"{self.refresh['count']} with paths set)"
                + (f" on 1 sequence, x {self.scale} sequences" if self.naive_scaled else "")
                + f", every R = {refresh} steps (m {r.m} {r.quadrature}, layers {r.layers or 'all'}, "
                f"sequences {r.sequences or 'all'}); " + note)
        return values, tags, note


def back_to_back(settings: Settings, variants: list[Variant]) -> dict[str, float]:
    """{variant: median ms per plain step} over windows of `BACK_TO_BACK` plain steps, each window
    ended by one device synchronize, the variants' windows interleaved."""
    windows = time_quantiles({v.name: (lambda v=v: [v.plain_step() for _ in range(BACK_TO_BACK)]) for v in variants},
                             settings, warmup=1, interleave=True)
    return {name: q[1] / BACK_TO_BACK for name, q in windows.items()}


def case_name(shape: str, precision: str, model_type: str = "bert", cuda_graphs: bool = False) -> str:
    """The step case of a shape at a precision and family: `<shape>[-<model_type>][-<precision>][-graphs]`,
    the family unless BERT, the precision unless fp32, `-graphs` under `train.cuda_graphs`."""
    return "-".join([shape] + [model_type] * (model_type != "bert") + [precision] * (precision != "fp32")
                    + ["graphs"] * cuda_graphs)


def run(settings: Settings, results: Results) -> None:
    """Per shape: build the variants, refresh the routed ones, time the plain steps interleaved."""
    import workload

    batch_size = settings.batch_size or (2 if settings.quick else 8)
    seq_len = settings.seq_len
    tokens = batch_size * seq_len
    names = settings.variants or VARIANTS
    tags = {"device": describe_device(settings.device), "precision": settings.precision}
    data_dir = workload.generated_dir()
    tf32 = workload.config(None, "hf_dense", data_dir).train.tf32
    for shape in settings.model_shapes():
        case = case_name(shape, settings.precision, settings.model_type, settings.cuda_graphs)
        if not settings.wants(case):
            continue
        variants = [Variant(settings, shape, name, data_dir, batch_size, seq_len) for name in names]
        measured = measure_many(settings, {v.name: v.plain_step for v in variants}, tokens, quantiles=True,
                                interleave=True, profile_first=settings.cuda_graphs)
        if settings.device.type == "cuda":
            for name, ms in back_to_back(settings, variants).items():
                measured[name]["back_to_back_ms"] = ms
        for v in variants:
            _check_finite(v.step)
            values, percentiles, note = v.amortized(measured[v.name], tokens)
            for metric, value in values.items():
                results.add(SUITE, case, v.name, metric, value, **tags, **percentiles)
            results.note(SUITE, f"{case} {v.name}: {note}")
        del variants
    results.note(SUITE, f"batch {batch_size} x {seq_len} full-length sequences, {settings.precision} "
                        f"(train.precision; train.tf32 {tf32}: TF32 fp32 matmuls on CUDA), random init, "
                        f"dropout {settings.dropout:g} (--dropout), train.static_shapes {settings.static_shapes}, "
                        f"train.cuda_graphs {str(settings.cuda_graphs).lower()} (trelm_naive eager); "
                        "the variants' steps are timed interleaved; "
                        "tokens_per_s counts every position; targets: trelm_fast wall_ms ratio <= 0.5 of "
                        "hf_dense on minilm, <= 0.8 of dense_opt and < 1 of frozen_dense")
