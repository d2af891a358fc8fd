"""`limit` suite: what the device can do, and how close each step variant gets to it.

- matmul rate: an n x n x n fp32 matmul, FLOP/s = 2 n^3 / median time (case `device`, variant `matmul`);
- memory bandwidth: copying a large fp32 tensor, B/s = 2 * bytes / median time (read + write;
  variant `copy`);
- FLOP floor of each step variant: its counted FLOPs (from the `step` suite) at the measured
  matmul rate, `floor_ms` = flops / rate; `efficiency` = floor_ms / measured wall_ms.
The floor ignores memory traffic and elementwise work, so efficiency is an upper bound on how
well the FLOPs are executed, not a roofline.
"""
from __future__ import annotations

import torch

from harness import Results, Settings, time_ms

SUITE = "limit"


def device_rates(settings: Settings, results: Results) -> float:
    """Measure and record the matmul rate and copy bandwidth; returns the matmul FLOP/s."""
    n = 1024 if settings.quick else 2048
    a = torch.randn(n, n, device=settings.device)
    b = torch.randn(n, n, device=settings.device)
    matmul_ms = time_ms(lambda: a @ b, settings)
    rate = 2 * n**3 / (matmul_ms / 1e3)
    results.add(SUITE, "device", "matmul", "flops_per_s", rate)
    results.add(SUITE, "device", "matmul", "wall_ms", matmul_ms)

    numel = (16 if settings.quick else 64) * 2**20  # fp32: 64 MiB / 256 MiB
    src = torch.randn(numel, device=settings.device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), settings)
    results.add(SUITE, "device", "copy", "bytes_per_s", 2 * src.nbytes / (copy_ms / 1e3))
    results.add(SUITE, "device", "copy", "wall_ms", copy_ms)
    results.note(SUITE, f"matmul {n}x{n}x{n} fp32; copy of {src.nbytes / 2**20:.0f} MiB fp32")
    return rate


def run(settings: Settings, results: Results) -> None:
    """Device rates, then floor and efficiency of every step variant measured in this run."""
    steps = [r for r in results.records if r["suite"] == "step" and r["metric"] == "flops"]
    if not steps:
        import suite_step

        suite_step.run(settings, results)
        steps = [r for r in results.records if r["suite"] == "step" and r["metric"] == "flops"]
    rate = device_rates(settings, results)
    for r in steps:
        wall = results.get("step", r["case"], r["variant"], "wall_ms")
        floor_ms = r["value"] / rate * 1e3
        results.add(SUITE, r["case"], r["variant"], "floor_ms", floor_ms)
        results.add(SUITE, r["case"], r["variant"], "efficiency", floor_ms / wall)
