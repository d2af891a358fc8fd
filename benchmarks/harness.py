"""Measurement primitives shared by every suite: wall-clock, FLOPs, peak memory, result records.

- `time_many(fns)` / `time_quantiles(fns)`: median (or p20, p50, p80) wall-clock of one call of each
  function, in milliseconds. CPU: `warmup`
  untimed rounds, then at least `repeats` rounds timed with `time.perf_counter` (more, up to
  MAX_REPEATS, until `min_time_s` has been spent: short calls get many samples); a round calls
  every function once, so the variants being compared are interleaved and share the machine's
  load alike. CUDA: `triton.testing.do_bench` with
  `quantiles` (it synchronizes and flushes the L2 cache between calls).
- `count_flops(fn)`: FLOPs of one call from `torch.utils.flop_counter.FlopCounterMode` (matmuls,
  convolutions and attention only; elementwise work is not counted, as in that counter), plus the
  FLOPs the Triton launchers record analytically (`trelm_fast.kernels._launch.kernel_flops`: the
  counter does not see inside a kernel, so on CUDA they would be missing).
- `peak_mem_mb(fn)`: the high-water mark of bytes allocated during one call, above what was
  allocated when the call started (activations, gradients, temporaries; parameters and optimizer
  state that already exist are not counted). CUDA: `torch.cuda.max_memory_allocated()` after
  `reset_peak_memory_stats()`, minus `memory_allocated()` at the start. CPU: the same quantity from
  the allocation events of `torch.profiler` (`profile_memory=True`): the maximum of the running sum
  of allocated and freed bytes over the call, in event order.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

METRICS = {
    "wall_ms": "ms",
    "tokens_per_s": "tokens/s",
    "flops": "FLOP",
    "peak_mem_mb": "MiB",
    "lookups_per_s": "lookups/s",
    "max_rel_err": "1",
    "time_to_target_s": "s",
    "efficiency": "1",
    "attribution_share": "1",
    "back_to_back_ms": "ms",  # the `step` suite on CUDA: steps with one synchronize per window
    "path_jaccard": "1",
    # the `limit` suite's device figures and floors
    "flops_per_s": "FLOP/s",
    "bytes_per_s": "B/s",
    "floor_ms": "ms",
    # the `convergence` suite's end-of-run figures
    "final_loss": "1",
    "final_p_at_1": "1",
}
"""Every metric a record may carry, with its unit (issue 7's names first)."""

SUITES = ("kernels", "step", "limit", "convergence")
MAX_REPEATS = 50


def interpret_triton_without_gpu() -> None:
    """Set TRITON_INTERPRET=1 (unless set) when there is no GPU, so the Triton kernels run interpreted
    on CPU tensors; call it before any kernel module is imported."""
    if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


class MissingComponent(RuntimeError):
    """A suite needs a part of trelm_fast that is not importable (yet); no numbers are made up."""


def require(module: str, *names: str):
    """Import `module` and return its attributes `names`, or raise MissingComponent naming them."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise MissingComponent(f"cannot import {module}: {err}") from err
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise MissingComponent(f"{module} has no {', '.join(missing)}")
    values = tuple(getattr(mod, n) for n in names)
    return values[0] if len(values) == 1 else values


@dataclass
class Settings:
    """What every suite is given: the device, quick mode and the timing repeats."""

    device: torch.device
    quick: bool
    warmup: int
    repeats: int
    out: Path
    min_time_s: float
    cases: list[str] | None = None
    """Glob patterns selecting case names (None: every case)."""
    shapes: list[str] | None = None
    """Model shapes of the step and sparse_ffn cases (None: minilm, plus bert-base unless quick)."""
    dropout: float = 0.1
    """Dropout of the step-suite models (BERT's 0.1 by default)."""
    precision: str = "fp32"
    """Training precision of the step suite (the trainer's `train.precision`): fp32, bf16 or fp16."""
    static_shapes: str = "never"
    """`train.static_shapes` of the step and convergence suites' variants (never, always, auto)."""
    cuda_graphs: bool = False
    """`train.cuda_graphs` of the step and convergence suites' variants (needs static_shapes always/auto; not trelm_naive)."""
    batch_size: int | None = None
    """Sequences per step-suite batch (None: 8, --quick 2)."""
    seq_len: int = 128
    """Tokens per step-suite sequence."""
    variants: list[str] | None = None
    """Step-suite variants to run (None: all of them)."""
    model_type: str = "bert"
    """Model family of the step suite and the attribution case (`workload.family_base_model`)."""
    budget_scale: float = 1.0
    """Convergence suite: factor on its step-time budgets (below 1: a reduced run, labelled so)."""
    probe_sample: int | None = None
    """Convergence suite: at most this many probe facts per split (None: all; a reduced run)."""
    start_pack: Path | None = None
    """Convergence suite: datasets and warm-up from this start pack (`start_pack.py`) instead of building them."""

    @classmethod
    def make(cls, device: str, quick: bool, out: Path, **options) -> "Settings":
        """Settings with the quick or full timing repeats; `options` set the other fields."""
        timing = ({"warmup": 1, "repeats": 3, "min_time_s": 0.3} if quick
                  else {"warmup": 2, "repeats": 5, "min_time_s": 2.0})
        return cls(torch.device(device), quick, out=out, **timing, **options)

    def model_shapes(self) -> list[str]:
        if self.shapes is not None:
            return self.shapes
        return ["minilm"] if self.quick else ["minilm", "bert-base"]

    def wants(self, case: str) -> bool:
        return self.cases is None or any(fnmatch.fnmatchcase(case, pattern) for pattern in self.cases)


@dataclass
class Results:
    """The records of one run, each `{"suite", "case", "variant", "metric", "value", "unit"}` (step
    records also carry `device` and `precision`)."""

    records: list[dict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Convergence curves per variant: loss_wall_s, loss, probe_wall_s, p_at_1 (curves.json)."""

    def add(self, suite: str, case: str, variant: str, metric: str, value: float, **tags: str) -> None:
        """Append a record; `tags` (e.g. device, precision) become extra keys of it."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
        value = float(value)
        if value != value:
            raise ValueError(f"{suite}/{case}/{variant}/{metric} is NaN")
        self.records.append(
            {"suite": suite, "case": case, "variant": variant, "metric": metric, "value": value, "unit": METRICS[metric],
             **tags}
        )

    def note(self, suite: str, text: str) -> None:
        """A line of context for `summary.md` (shapes, settings, where the time goes)."""
        self.notes.setdefault(suite, []).append(text)

    def get(self, suite: str, case: str, variant: str, metric: str) -> float | None:
        for r in self.records:
            if (r["suite"], r["case"], r["variant"], r["metric"]) == (suite, case, variant, metric):
                return r["value"]
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


QUANTILES = (0.2, 0.5, 0.8)
"""The wall-clock percentiles a timing reports (p20, p50 = the median, p80)."""


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of ``samples`` (linear interpolation; p50 is the median)."""
    if len(samples) < 2:
        return (samples[0],) * 3
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return deciles[1], deciles[4], deciles[7]


def time_quantiles(fns: dict[str, Callable[[], object]], settings: Settings, warmup: int | None = None,
                   repeats: int | None = None, interleave: bool = False) -> dict[str, tuple[float, float, float]]:
    """(p20, p50, p80) wall-clock in ms of one call of each of `fns`, timed interleaved.

    The calls go round-robin (a, b, c, a, b, c, ...), each ended by a device synchronize, so a
    change in the load of a shared machine hits every variant alike and ratios within one run stay
    fair. `warmup` / `repeats` override the settings (calls of many seconds each). CUDA, unless
    `interleave`: `triton.testing.do_bench` per function (kernels: no host sync per call; its 100 ms
    budget makes few samples of calls of tens of ms, so whole training steps pass `interleave`).
    """
    if settings.device.type == "cuda" and not interleave:
        import triton.testing

        return {name: tuple(float(t) for t in triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES)))
                for name, fn in fns.items()}
    warmup = settings.warmup if warmup is None else warmup
    repeats = settings.repeats if repeats is None else repeats
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < repeats or (min(sum(t) for t in times.values()) < settings.min_time_s * 1e3 and rounds < MAX_REPEATS):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(settings.device)
            times[name].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    return {name: _percentiles(t) for name, t in times.items()}


def time_many(fns: dict[str, Callable[[], object]], settings: Settings, warmup: int | None = None,
              repeats: int | None = None) -> dict[str, float]:
    """Median wall-clock in ms of one call of each of `fns` (`time_quantiles`' p50)."""
    return {name: q[1] for name, q in time_quantiles(fns, settings, warmup, repeats).items()}


def time_ms(fn: Callable[[], object], settings: Settings, warmup: int | None = None, repeats: int | None = None) -> float:
    """Median wall-clock of one call of `fn`, in ms (see `time_many`)."""
    return time_many({"fn": fn}, settings, warmup, repeats)["fn"]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn`: `torch.utils.flop_counter.FlopCounterMode` plus Triton kernels' own."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        from trelm_fast.kernels._launch import kernel_flops
    except ImportError:  # the harness's own tests run without trelm_fast's kernels
        kernel_flops = lambda: 0  # noqa: E731
    counter = FlopCounterMode(display=False)
    before = kernel_flops()
    with counter:
        fn()
    return int(counter.get_total_flops()) + kernel_flops() - before


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 (kineto prints a line to it at every profiler start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        extra = event.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation" and extra.device.type == "cpu":
            events.append((event.start_time_ns, extra.alloc_size))
        stack.extend(event.children)
    events.sort()
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def peak_mem_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated during one call of `fn` above the allocation at its start, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    return _cpu_peak_bytes(fn) / 2**20


def count_and_profile(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(flops, peak_mem_mb) of a single call of `fn`, for calls too slow to make twice."""
    peak: list[float] = []
    flops = count_flops(lambda: peak.append(peak_mem_mb(fn, device)))
    return float(flops), peak[0]


def measure_many(settings: Settings, fns: dict[str, Callable[[], object]], tokens: int | None = None,
                 memory: bool = True, quantiles: bool = False, interleave: bool = False,
                 profile_first: bool = False) -> dict[str, dict[str, float]]:
    """{name: {metric: value}} for each of `fns`: flops, peak_mem_mb (if `memory`), wall_ms (the
    median, see `time_quantiles`, which gets `interleave`), tokens_per_s (if `tokens`), and with
    `quantiles` also "quantiles_ms": (p20, p50, p80) (not a metric: the caller makes tags of it).
    The counted and profiled calls come first and count as warm-up calls. `profile_first`: the first
    call is counted and profiled at once (`count_and_profile`), for calls whose first run does work
    the later ones reuse (a CUDA-graph capture allocates the graph's memory pool; replays allocate
    nothing)."""
    profiled_apart = memory and not profile_first  # one more call, profiled on its own
    if profile_first:
        values = {name: dict(zip(("flops", "peak_mem_mb")[:1 + memory], count_and_profile(fn, settings.device)))
                  for name, fn in fns.items()}
    else:
        values = {name: {"flops": float(count_flops(fn))} for name, fn in fns.items()}
    if profiled_apart:
        for name, fn in fns.items():
            values[name]["peak_mem_mb"] = peak_mem_mb(fn, settings.device)
    walls = time_quantiles(fns, settings, warmup=max(0, settings.warmup - 1 - profiled_apart), interleave=interleave)
    for name, wall in walls.items():
        values[name]["wall_ms"] = wall[1]
        if quantiles:
            values[name]["quantiles_ms"] = wall
        if tokens is not None:
            values[name]["tokens_per_s"] = tokens / (wall[1] / 1e3)
    return values


def measure_heavy(settings: Settings, fn: Callable[[], object], tokens: int | None = None,
                  profile: bool = True) -> tuple[object, dict[str, float]]:
    """(fn's result, {metric: value}) for calls of many seconds each.

    One timed call (wall_ms; its result is returned for correctness checks), then, if `profile`
    and not --quick, one more call both counted (flops) and profiled (peak_mem_mb).
    """
    start = time.perf_counter()
    out = fn()
    _sync(settings.device)
    values = {"wall_ms": (time.perf_counter() - start) * 1e3}
    if profile and not settings.quick:
        values["flops"], values["peak_mem_mb"] = count_and_profile(fn, settings.device)
    if tokens is not None:
        values["tokens_per_s"] = tokens / (values["wall_ms"] / 1e3)
    return out, values


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def _git(*args: str) -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    return f"CPU {_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def meta(settings: Settings, suites: list[str]) -> dict:
    """Device, versions, commit and date of a run."""
    import numpy
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": describe_device(settings.device),
        "device_type": settings.device.type,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
        },
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "suites": suites,
        "load_average_1m": os.getloadavg()[0],  # other processes slow CPU figures down
        "quick": settings.quick,
        "step_dropout": settings.dropout,
        "step_precision": settings.precision,
        "step_static_shapes": settings.static_shapes,
        "step_cuda_graphs": settings.cuda_graphs,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "timing": "triton.testing.do_bench quantiles" if settings.device.type == "cuda" else "perf_counter median after warm-up",
        "peak_mem": "bytes allocated during one call above the allocation at its start"
        + (" (torch.cuda.max_memory_allocated)" if settings.device.type == "cuda" else " (torch.profiler allocation events)"),
    }


def to_json(results: Results, meta_: dict) -> dict:
    return {"meta": {**meta_, "errors": results.errors, "notes": results.notes}, "records": results.records}

