"""`step` suite: one training step (forward, backward, optimizer) of each DESIGN.md section 3 variant.

Cases `minilm` and `bert-base` (workload.SHAPES; --quick: `minilm` only, batch 2 x 128; `--shape`
selects others), batch 8 x 128 full-length sequences (workload.full_batch), random init. Each variant is the trainer's own
step object (`trelm_fast.step.make_step`): `hf_dense`, `dense_opt`, `trelm_naive`, `trelm_fast`.

Routed variants refresh their knowledge paths every R steps (`routing.refresh`), so their figures
are amortized: wall_ms = (median step without a refresh) + (attribution time) / R, and likewise
flops; `attribution_share` = (attribution time / R) / wall_ms. The attribution time is the step's
own timer (`time/attribution_s`) on one refresh step, measured in the same call that counts its
FLOPs and profiles its memory (their per-op overhead is small next to the m passes). peak_mem_mb
is the larger of the refresh step's and a plain step's. `trelm_naive`'s per-layer, per-sequence
loop is linear in the sequences: on `bert-base` it is run on 1 sequence (`routing.sequences=1`) and
its time and FLOPs are multiplied by the batch size (said in the notes).
"""
from __future__ import annotations

import itertools

import torch

from harness import Results, Settings, count_flops, measure, peak_mem_mb, time_ms

SUITE = "step"
VARIANTS = ("hf_dense", "dense_opt", "trelm_naive", "trelm_fast")


def _checked(result) -> None:
    if result.skipped_nonfinite:
        raise RuntimeError(f"step skipped: non-finite loss {result.loss}; the timing would not be a step")


def run_variant(settings: Settings, results: Results, shape: str, variant: str, data_dir, batch_size: int) -> str:
    """Measure one variant at one shape; returns a note for the summary."""
    import workload

    naive_scaled = variant == "trelm_naive" and shape != "minilm"
    step, model = workload.build_step(variant, shape, data_dir, settings.device,
                                      ["routing.sequences=1"] if naive_scaled else [])
    batch = workload.full_batch(data_dir, batch_size, 128)
    tokens = batch_size * 128
    refresh = step.cfg.routing.refresh
    routed = step.router is not None
    if routed and refresh == 1:
        raise ValueError("step suite: routing.refresh = 1 leaves no step without a refresh to time")

    refresh_stats: dict = {}
    refresh_peak: dict = {}
    if routed:  # step 0 refreshes the paths: one call, counted, profiled and timed by the step itself

        def refresh_step():
            result = step(batch, 0)
            _checked(result)
            refresh_stats.update(result.stats)

        def profiled():
            refresh_peak["mb"] = peak_mem_mb(refresh_step, settings.device)

        refresh_flops = count_flops(profiled)
    indices = (i for i in itertools.count(1) if not routed or i % refresh)

    def plain_step():
        _checked(step(batch, next(indices)))

    values = measure(settings, plain_step, tokens)
    note = f"{shape} {variant}: "
    if routed:
        scale = batch_size if naive_scaled else 1
        attr_ms = refresh_stats["time/attribution_s"] * 1e3 * scale / refresh
        values["flops"] += max(0.0, refresh_flops - values["flops"]) * scale / refresh
        values["wall_ms"] += attr_ms
        values["tokens_per_s"] = tokens / (values["wall_ms"] / 1e3)
        values["peak_mem_mb"] = max(values["peak_mem_mb"], refresh_peak["mb"])
        values["attribution_share"] = attr_ms / values["wall_ms"]
        r = step.cfg.routing
        note += (f"attribution {refresh_stats['time/attribution_s']:.2f} s per refresh"
                 + (f" on 1 sequence, x {scale} sequences" if naive_scaled else "")
                 + f", every R = {refresh} steps (m {r.m} {r.quadrature}, layers {r.layers or 'all'}, "
                 f"sequences {r.sequences or 'all'}); ")
    note += f"step without refresh {values['wall_ms'] - (attr_ms if routed else 0):.0f} ms"
    for metric, value in values.items():
        results.add(SUITE, shape, variant, metric, value)
    return note


def run(settings: Settings, results: Results) -> None:
    import workload

    shapes = settings.model_shapes()
    batch_size = 2 if settings.quick else 8
    data_dir = workload.dataset_dir()
    for shape in shapes:
        if not settings.wants(shape):
            continue
        for variant in VARIANTS:
            results.note(SUITE, run_variant(settings, results, shape, variant, data_dir, batch_size))
    results.note(SUITE, f"batch {batch_size} x 128 full-length sequences, fp32, random init, dropout 0.1; "
                        "tokens_per_s counts every position; targets: trelm_fast wall_ms ratio <= 0.5 of hf_dense "
                        "on minilm and below dense_opt")
