"""`python benchmarks/horizon_seeds.py --out DIR RUN_DIR [RUN_DIR ...] [--measure p_at_1_said_10+ ...]
[--label OLD=NEW ...] [--variant LABEL ...]`

Several `convergence_horizon.py` runs, read back from their curves.json, as one result over seeds.
Per seed and measure, the mark is 80% of that seed's `dense` gain and each variant's time to it is
interpolated between evaluations, as in the horizon's own time-to-mark table
(`convergence_horizon.times_to_mark`), with its ratio to dense's time and its value at the end.
Per variant, the median and range of those ratios over the seeds follow, the median final value,
the median of each seed's mean over the second half of its run (`second_half_mean`: the level a
run holds late, where one evaluation's swing decides less than it does the final value), and one
plot of every curve (`report.plot_convergence`: a colour per variant, a line per seed).

Runs of one seed made in separate calls share the common start and the data order, not the
machine's moment, so the summary names the directory of every curve. A curve key
(`<dataset>/<label>/seed<k>`) found in two directories is an error: say which one to use by leaving
the other out. `--label OLD=NEW` reads the curves of variant label OLD as NEW (a run made before a
rename: `--label trelm_embeddings@0.001=trelm`); `--variant` keeps only the labels it names (after
`--label`) beside the dense runs. Writes DIR/summary.md and DIR/seeds.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

from convergence_horizon import dense_reference, is_dense, lower_is_better, times_to_mark, write_atomically
from report import plot_convergence

DEFAULT_MEASURES = ("p_at_1_said_10+", "valid_mlm_loss")


def parse_label(text: str) -> tuple[str, str]:
    """'OLD=NEW' -> (OLD, NEW), both non-empty and without '=' (as `convergence_horizon.parse_variant`
    parses NAME=LR)."""
    old, sep, new = text.partition("=")
    if not (sep and old and new) or "=" in new:
        raise argparse.ArgumentTypeError(f"--label takes OLD=NEW, got {text!r}")
    return old, new


def load_curves(run_dirs: list[Path], labels: dict[str, str] | None = None,
                keep: set[str] | None = None) -> tuple[dict[str, dict], dict[str, Path]]:
    """Every curve of `run_dirs` by key, and the directory each came from; a variant label in
    `labels` is read as its value, and with `keep` only the dense curves and those labels are kept."""
    labels = labels or {}
    curves, source = {}, {}
    for run_dir in run_dirs:
        path = run_dir / "curves.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (not a convergence_horizon.py output directory)")
        for key, curve in json.loads(path.read_text()).items():
            dataset, label, seed = key.split("/")
            label = labels.get(label, label)
            if keep is not None and label not in keep and not is_dense(label):
                continue
            key = f"{dataset}/{label}/{seed}"
            if key in curves:
                raise SystemExit(f"{key} is in both {source[key]} and {run_dir}: leave one of them out")
            curves[key], source[key] = curve, run_dir
    return curves, source


def second_half_mean(curve: dict, measure: str) -> float:
    """Mean of `measure` over the evaluations at or after half the run's last clock (`probe_wall_s`)."""
    half = curve["probe_wall_s"][-1] / 2
    late = [v for t, v in zip(curve["probe_wall_s"], curve[measure]) if t >= half]
    return sum(late) / len(late)


class SeedRow(NamedTuple):
    """One variant on one seed: time to the seed's dense mark (None: not reached), its ratio to
    dense's time (None for dense or where a time is missing), the final value, `second_half_mean`."""
    time: float | None
    ratio: float | None
    final: float
    late: float


def seed_rows(curves: dict[str, dict], measure: str) -> dict[str, dict[int, SeedRow]]:
    """variant label -> seed -> its `SeedRow`.
    Seeds without a dense curve of at least two evaluations (`dense_reference`), or whose dense never
    improves the measure, are left out; ratio None where either time is missing."""
    by_seed: dict[int, dict[str, dict]] = {}
    for key, curve in curves.items():
        _, label, seed = key.split("/")
        if measure in curve:
            by_seed.setdefault(int(seed.removeprefix("seed")), {})[label] = curve
    rows: dict[str, dict[int, tuple]] = {}
    for seed, runs in sorted(by_seed.items()):
        reference = dense_reference(runs)
        if reference is None:
            continue
        mark, times = times_to_mark(runs, reference, measure)
        if abs(mark) == float("inf"):
            continue
        for label, t in times.items():
            ratio = t / times[reference] if t is not None and times[reference] and not is_dense(label) else None
            curve = runs[label]
            rows.setdefault(label, {})[seed] = SeedRow(t, ratio, curve[measure][-1], second_half_mean(curve, measure))
    return rows


def measure_lines(curves: dict[str, dict], measure: str) -> list[str]:
    """The per-seed table and the per-variant line over seeds for one measure."""
    rows = seed_rows(curves, measure)
    if not rows:
        return [f"## {measure}", "", "No seed has a dense run that improves it: no mark.", ""]
    seeds = sorted({s for per_seed in rows.values() for s in per_seed})
    lines = [f"## {measure}", "",
             "Cells: time to the seed's dense mark (ratio to dense's time) / value at the end.", "",
             "| variant | " + " | ".join(f"seed {s}" for s in seeds)
             + " | median ratio (range) | median final | median mean, second half |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for label, per_seed in rows.items():
        cells = []
        for s in seeds:
            if s not in per_seed:
                cells.append("")
                continue
            row = per_seed[s]
            cells.append(("not reached" if row.time is None
                          else f"{row.time:.0f} s" + (f" ({row.ratio:.2f}x)" if row.ratio else ""))
                         + f" / {row.final:.3f}")
        ratios = [row.ratio for row in per_seed.values() if row.ratio is not None]
        missed = sum(row.time is None for row in per_seed.values())
        spread = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "")
        spread += f"{'; ' if ratios else ''}not reached in {missed} of {len(per_seed)}" if missed else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {spread} | "
                     f"{statistics.median(row.final for row in per_seed.values()):.3f} | "
                     f"{statistics.median(row.late for row in per_seed.values()):.3f} |")
    return lines + [""]


def summary(curves: dict[str, dict], source: dict[str, Path], measures: list[str]) -> list[str]:
    return ["# Convergence horizon over seeds", "",
            f"- command: `benchmarks/horizon_seeds.py {' '.join(sys.argv[1:])}`",
            "- the mark per seed and measure: 80% of that seed's dense gain from the start to its best evaluation ("
            + ", ".join(f"{m}: {'lower' if lower_is_better(m) else 'higher'} is better" for m in measures) + ")",
            "- curves, from: " + "; ".join(f"`{k}` {source[k]}" for k in curves), "",
            *[line for m in measures for line in measure_lines(curves, m)]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="convergence_horizon.py --out directories")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--measure", action="append", default=None,
                   help=f"a curve key (repeatable; default {' '.join(DEFAULT_MEASURES)})")
    p.add_argument("--label", action="append", type=parse_label, default=[], metavar="OLD=NEW",
                   help="read the curves of variant label OLD as NEW (repeatable)")
    p.add_argument("--variant", action="append", default=None, metavar="LABEL",
                   help="keep only these variant labels beside the dense runs (repeatable; default: all)")
    args = p.parse_args(argv)
    curves, source = load_curves(args.run_dirs, dict(args.label), None if args.variant is None else set(args.variant))
    args.out.mkdir(parents=True, exist_ok=True)
    lines = summary(curves, source, args.measure or list(DEFAULT_MEASURES))
    write_atomically(args.out / "summary.md", "\n".join(lines) + "\n")
    plot_convergence(curves, args.out / "seeds.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
