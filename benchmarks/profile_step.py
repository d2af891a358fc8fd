"""`python benchmarks/profile_step.py --out DIR [--shape bert-base] [--precision bf16] [--variant NAME ...]
[--batch-size 64] [--seq-len 128] [--steps 10] [--refresh] [--cuda-graphs] [--model-type bert]`

Where a step's time goes, per step-suite variant (the same step objects and batches as suite_step):
`--steps` plain steps (after a warm-up) under `torch.profiler`, CPU and (on a GPU) CUDA activities.
Per variant it writes DIR/<case>-<variant>.txt, the profiler's top ops by device time and by host
self time, and DIR/profile.json with, per plain step: `wall_ms` (timed unprofiled, median),
`device_ms` (kernel time, summed), `launches` (kernel launch calls), `syncs` (host waits for the
GPU: stream, device and event synchronizations), `graph_launches` (CUDA-graph replays) and `ops`
(aten ops); the CUDA figures are 0 on CPU. A step that is host-bound shows `device_ms` well under
`wall_ms`. With `--refresh`, the same for one refresh step with paths set (routed variants), as
`refresh_*`. With `--cuda-graphs`, every variant but `trelm_naive` has static shapes and replays its
plain steps as CUDA graphs (suite_step's `-graphs` cases; on CPU rehearsed eagerly): then `launches`
and `ops` count what the host still does around a replay, and `device_ms` the replayed kernels.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from harness import Settings, _sync, describe_device, interpret_triton_without_gpu

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _figures(prof, calls: int) -> dict[str, float]:
    """Per-call device time, launches, host syncs and aten ops of a profiled run of `calls` calls."""
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    count = lambda names: sum(e.count for e in events if e.key in names)  # noqa: E731
    return {"device_ms": device_us / 1e3 / calls, "launches": count(LAUNCHES) / calls, "syncs": count(SYNCS) / calls,
            "graph_launches": count(("cudaGraphLaunch",)) / calls,
            "ops": sum(e.count for e in events if e.key.startswith("aten::")) / calls}


def _tables(prof, cuda: bool) -> str:
    """The top ops by device time (CUDA only) and by host self time, as markdown sections."""
    events = prof.key_averages()
    sections = [("device time", "self_device_time_total")] if cuda else []
    sections.append(("host self time", "self_cpu_time_total"))
    return "\n\n".join(f"## top ops by {what}\n\n" + events.table(sort_by=key, row_limit=40)
                        for what, key in sections) + "\n"


def _profiled(fn, calls: int, device: torch.device):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    return prof


def profile_variant(settings: Settings, shape: str, name: str, steps: int, refresh: bool, out: Path) -> dict:
    """Profile one variant (see the module docstring); writes its .txt and returns its figures."""
    import suite_step
    import workload

    device, cuda = settings.device, settings.device.type == "cuda"
    variant = suite_step.Variant(settings, shape, name, workload.generated_dir(), settings.batch_size, settings.seq_len)
    for _ in range(settings.warmup):
        variant.plain_step()
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        variant.plain_step()
        _sync(device)
        walls.append((time.perf_counter() - start) * 1e3)
    prof = _profiled(variant.plain_step, steps, device)
    figures = {"wall_ms": statistics.median(walls), **_figures(prof, steps)}
    case = suite_step.case_name(shape, settings.precision, settings.model_type, settings.cuda_graphs)
    text = f"# {case} {name}: plain step x {steps}\n\n" + _tables(prof, cuda)
    if refresh and variant.routed:
        index = 10 * variant.routing.refresh  # a refresh step with paths set
        start = time.perf_counter()
        variant.step(variant.batch, index)
        _sync(device)
        figures["refresh_wall_ms"] = (time.perf_counter() - start) * 1e3
        prof = _profiled(lambda: variant.step(variant.batch, index + variant.routing.refresh), 1, device)
        figures.update({f"refresh_{k}": v for k, v in _figures(prof, 1).items()})
        text += "\n# one refresh step with paths set\n\n" + _tables(prof, cuda)
    (out / f"{case}-{name}.txt").write_text(text)
    return figures


def main(argv: list[str] | None = None) -> int:
    import suite_step

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="bert-base", choices=("tiny", "minilm", "bert-base"))
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--variant", action="append", choices=suite_step.VARIANTS, default=None,
                   help="repeatable (default: hf_dense, dense_opt, frozen_dense, trelm_fast)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="plain steps timed, then as many profiled (default 10)")
    p.add_argument("--refresh", action="store_true", help="also profile one refresh step with paths set")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="static shapes and CUDA-graph replays of the plain steps (not trelm_naive)")
    p.add_argument("--model-type", default="bert", help="model family (as benchmarks/run.py; default bert)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.variant or ["hf_dense", "dense_opt", "frozen_dense", "trelm_fast"]
    settings = Settings.make(args.device, False, args.out, shapes=[args.shape], precision=args.precision,
                             batch_size=args.batch_size, seq_len=args.seq_len, variants=names,
                             model_type=args.model_type, cuda_graphs=args.cuda_graphs,
                             static_shapes="always" if args.cuda_graphs else "never")
    report = {"device": describe_device(settings.device), "shape": args.shape, "model_type": args.model_type,
              "precision": args.precision, "cuda_graphs": args.cuda_graphs,
              "batch": [args.batch_size, args.seq_len], "steps": args.steps, "variants": {}}
    for name in names:
        report["variants"][name] = profile_variant(settings, args.shape, name, args.steps, args.refresh, args.out)
        print(f"[profile] {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in report["variants"][name].items()), flush=True)
    (args.out / "profile.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    interpret_triton_without_gpu()
    raise SystemExit(main())
