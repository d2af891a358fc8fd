"""`step` suite: one training step (forward, backward, optimizer) of each DESIGN.md section 3 variant.

Cases `minilm` and `bert-base` (workload.SHAPES; --quick: `minilm` only, batch 2 x 128; `--shape`
selects others), batch 8 x 128 full-length sequences (workload.full_batch; `--batch-size`, `--seq-len`),
random init, the generated dataset (workload.generated_dir). Each variant is the trainer's own step
object (`trelm_fast.step.make_step`): `hf_dense`, `dense_opt`, `trelm_naive`, `trelm_fast` (`--variant`
selects some). The precision is the trainer's `train.precision` (`--precision`, default fp32); a case
is named after its shape, with `-bf16` / `-fp16` appended at those precisions, and every record
carries `device` and `precision`.

Routed variants refresh their knowledge paths every R steps (`routing.refresh`), so their figures
are amortized: wall_ms = (median step without a refresh) + (attribution time) / R, and likewise
flops; `attribution_share` = (attribution time / R) / wall_ms. The attribution time is the step's
own timer (`time/attribution_s`) on one refresh step, measured in the same call that counts its
FLOPs and profiles its memory (their per-op overhead is small next to the m passes). peak_mem_mb
is the larger of the refresh step's and a plain step's. `trelm_naive`'s per-layer, per-sequence
loop is linear in the sequences: outside `minilm` it is run on 1 sequence (`routing.sequences=1`) and
its time and FLOPs are multiplied by the number of sequences the configuration attributes (said in
the notes).
"""
from __future__ import annotations

import itertools
import statistics

from harness import Results, Settings, count_and_profile, describe_device, measure_many

SUITE = "step"
VARIANTS = ("hf_dense", "dense_opt", "trelm_naive", "trelm_fast")
PHASES = ("forward", "backward", "optimizer", "bank")
"""The step's own timers (`time/<phase>_s` in its stats; `other` = the rest of `time/step_s`:
negative sampling, moving the batch), reported as a breakdown in the notes."""


def _checked(result) -> None:
    if result.skipped_nonfinite:
        raise RuntimeError(f"step skipped: non-finite loss {result.loss}; the timing would not be a step")


class Variant:
    """One step variant at one shape: the trainer's step object, its batch, and its refresh figures."""

    def __init__(self, settings: Settings, shape: str, name: str, data_dir, batch_size: int, seq_len: int):
        import workload

        self.name = name
        self.routing = workload.config(shape, name, data_dir).routing  # as configured, before any override
        sequences = min(batch_size, self.routing.sequences or batch_size)
        self.naive_scaled = name == "trelm_naive" and shape != "minilm" and sequences > 1
        overrides = [f"model.dropout={settings.dropout}", f"train.precision={settings.precision}"]
        overrides += ["routing.sequences=1"] if self.naive_scaled else []
        self.step, self.model = workload.build_step(name, shape, data_dir, settings.device, overrides)
        self.batch = workload.full_batch(data_dir, batch_size, seq_len)
        self.routed = self.step.router is not None
        if self.routed and self.routing.refresh == 1:
            raise ValueError("step suite: routing.refresh = 1 leaves no step without a refresh to time")
        self.scale = sequences if self.naive_scaled else 1
        self.indices = (i for i in itertools.count(1) if not self.routed or i % self.routing.refresh)
        self.refresh = {}
        self.phases: dict[str, list[float]] = {}
        if self.routed:  # step 0 refreshes the paths: one call, counted, profiled and timed by the step itself
            stats: dict = {}

            def refresh_step():
                result = self.step(self.batch, 0)
                _checked(result)
                stats.update(result.stats)

            flops, peak = count_and_profile(refresh_step, settings.device)
            self.refresh = {"flops": flops, "peak_mem_mb": peak, "attribution_s": stats["time/attribution_s"]}

    def plain_step(self) -> None:
        """A step whose index is not a refresh step; keeps the step's own phase timers."""
        result = self.step(self.batch, next(self.indices))
        _checked(result)
        times = {phase: result.stats.get(f"time/{phase}_s", 0.0) for phase in PHASES}
        times["other"] = max(0.0, result.stats.get("time/step_s", 0.0) - sum(times.values()))
        for phase, t in times.items():
            self.phases.setdefault(phase, []).append(t)

    def breakdown(self) -> str:
        """Median share of each phase in a step without refresh (the step's own timers)."""
        med = {p: statistics.median(t) for p, t in self.phases.items()}
        total = sum(med.values())
        return ", ".join(f"{p} {v / total:.0%}" for p, v in med.items()) if total > 0 else ""

    def amortized(self, values: dict[str, float], tokens: int) -> tuple[dict[str, float], str]:
        """Add the refresh cost / R to a plain step's figures; returns them and a note."""
        note = f"step without refresh {values['wall_ms']:.0f} ms ({self.breakdown()})"
        if not self.routed:
            return values, note
        r, refresh = self.routing, self.routing.refresh
        attr_ms = self.refresh["attribution_s"] * 1e3 * self.scale / refresh
        values["flops"] += max(0.0, self.refresh["flops"] - values["flops"]) * self.scale / refresh
        values["wall_ms"] += attr_ms
        values["tokens_per_s"] = tokens / (values["wall_ms"] / 1e3)
        values["peak_mem_mb"] = max(values["peak_mem_mb"], self.refresh["peak_mem_mb"])
        values["attribution_share"] = attr_ms / values["wall_ms"]
        note = (f"attribution {self.refresh['attribution_s']:.2f} s per refresh"
                + (f" on 1 sequence, x {self.scale} sequences" if self.naive_scaled else "")
                + f", every R = {refresh} steps (m {r.m} {r.quadrature}, layers {r.layers or 'all'}, "
                f"sequences {r.sequences or 'all'}); " + note)
        return values, note


def case_name(shape: str, precision: str) -> str:
    """The step case of a shape at a precision: the shape itself at fp32, else `<shape>-<precision>`."""
    return shape if precision == "fp32" else f"{shape}-{precision}"


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
        case = case_name(shape, settings.precision)
        if not settings.wants(case):
            continue
        variants = [Variant(settings, shape, name, data_dir, batch_size, seq_len) for name in names]
        measured = measure_many(settings, {v.name: v.plain_step for v in variants}, tokens)
        for v in variants:
            values, note = v.amortized(measured[v.name], tokens)
            for metric, value in values.items():
                results.add(SUITE, case, v.name, metric, value, **tags)
            results.note(SUITE, f"{case} {v.name}: {note}")
        del variants
    results.note(SUITE, f"batch {batch_size} x {seq_len} full-length sequences, {settings.precision} "
                        f"(train.precision; train.tf32 {tf32}: TF32 fp32 matmuls on CUDA), random init, "
                        f"dropout {settings.dropout:g} (--dropout); the variants' steps are timed interleaved; "
                        "tokens_per_s counts every position; targets: trelm_fast wall_ms ratio <= 0.5 of "
                        "hf_dense on minilm and below dense_opt")
