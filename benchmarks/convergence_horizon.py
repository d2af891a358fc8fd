"""`python benchmarks/convergence_horizon.py --out DIR [--dataset small] [--variant dense=1e-4 ...]
[--budget-s 600] [--evals 10] [--probe-sample N] [--seed 0] [--start-pack DIR] [--by-statements]
[--cuda-graphs]`

A long look at one seed: what each variant learns given far more time than the convergence suite
can give it (its seed runs get 50 s of step time, so that sweeps, 3 seeds and the ablations fit in
60 minutes). The variants (`suite_convergence` names or its `DIAGNOSTICS`, each at a given
learning rate: no sweep) start from the suite's common start (the cached MLM-head warm-up) and
advance in turns, each on its
own step clock (`suite_convergence.Run`), evaluated every budget / evals seconds of it: P@1 on the
stated and held-out facts and the validation MLM loss. The summary gives, beside them, the P@1 of
answering each relation's most common stated object (`trelm_fast.probe.relation_prior`): a P@1 at
or below it is the common answers learned, not the facts; stated above held-out is what was learned
from the text.

--by-statements (a synthetic dataset only): also P@1 on the stated facts in the corpus's own phrasing,
split by how many corpus sentences state each fact (`STATEMENT_BUCKETS`; counted by
`synthetic.corpus_phrased`), with each bucket's relation prior in the notes: whether the facts the
text states most often are learned, when the probes' new phrasing shows nothing.

With a `dense` run, the summary ends with the time to a mark per measure: 80% of that run's gain
(`suite_convergence.target_of`, the suite's target), the clock interpolated between evaluations.

Writes DIR/curves.json, DIR/horizon.png (`report.plot_convergence`) and DIR/summary.md. curves.json
and summary.md are rewritten after every evaluation of any run (each atomically), with a progress line
on stdout, so a run cut off (a device time limit) keeps what it had evaluated; until the last write the
summary says it is incomplete. The plot is drawn at the end only.
--quick: the suite's tiny plan (random-init 2-layer model), a few seconds (the CI smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from harness import Settings, Results, interpret_triton_without_gpu, meta

if __name__ == "__main__":
    interpret_triton_without_gpu()
import suite_convergence as sc
from report import plot_convergence

MEASURES = ("p_at_1_stated", "p_at_1_heldout", "valid_mlm_loss")
HORIZON_VARIANTS = {**sc.ALL_VARIANTS, **sc.DIAGNOSTICS}
STATEMENT_BUCKETS = {"said_1-2": (1, 2), "said_3-9": (3, 9), "said_10+": (10, None)}
"""--by-statements: probe split name -> (fewest, most) corpus sentences stating a fact (None: no bound)."""


def parse_variant(text: str) -> tuple[str, float]:
    """'name=lr' -> (name, lr), name one of the convergence suite's variants or its `DIAGNOSTICS`."""
    name, sep, lr = text.partition("=")
    if not sep or name not in HORIZON_VARIANTS:
        raise argparse.ArgumentTypeError(
            f"--variant must be NAME=LR with NAME one of {', '.join(HORIZON_VARIANTS)}, got {text!r}")
    try:
        return name, float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: {lr!r} is not a learning rate") from None


def run_labels(variants: list[tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """{label: (name, lr)}: a variant's label is its name, or name@lr where a name is given at several
    rates (`--variant dense=1e-4 --variant dense=3e-4`); a repeated (name, lr) is an error."""
    names = [name for name, _ in variants]
    labels = {(f"{name}@{lr:g}" if names.count(name) > 1 else name): (name, lr) for name, lr in variants}
    if len(labels) < len(variants):
        raise SystemExit(f"--variant: a variant is given twice at the same rate: {variants}")
    return labels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dataset", choices=sorted(sc.DATASETS), default="small")
    p.add_argument("--variant", action="append", type=parse_variant, default=None, metavar="NAME=LR",
                   help="a variant and its learning rate (repeatable; default dense=1e-4 trelm=3e-3)")
    p.add_argument("--budget-s", type=float, default=600.0, help="seconds of step time per variant (default 600)")
    p.add_argument("--evals", type=int, default=10, help="evaluations per run after the start (default 10)")
    p.add_argument("--probe-sample", type=int, default=None, metavar="N",
                   help="at most N probe facts per split, every k-th (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-pack", type=Path, default=None, metavar="DIR",
                   help="the dataset and its warm-up from DIR/<dataset> (benchmarks/start_pack.py), no build")
    p.add_argument("--by-statements", action="store_true",
                   help="also P@1 in the corpus's phrasing by how often the corpus states a fact (synthetic data)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="every variant with train.static_shapes=always and train.cuda_graphs=true "
                        "(plain steps as CUDA-graph replays; on CPU rehearsed eagerly)")
    p.add_argument("--quick", action="store_true", help="the suite's tiny plan: a smoke run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.budget_s <= 0 or args.evals < 1:
        p.error("--budget-s must be > 0 and --evals >= 1")
    return args


def add_statement_splits(evaluate: sc.Evaluator, data_dir: Path) -> list[str]:
    """Add the `STATEMENT_BUCKETS` probe splits (stated facts in corpus phrasing) to `evaluate`;
    returns their notes (facts and relation prior per split)."""
    from trelm_fast.data.loader import load_manifest
    from trelm_fast.data.sources.synthetic import corpus_phrased, generate

    config = load_manifest(data_dir)["config"]
    if config.get("source") != "synthetic":
        raise SystemExit(f"--by-statements: {data_dir} was not built from the synthetic source")
    raw = generate(config["size"], config["seed"])
    phrased = corpus_phrased(raw.probes, raw.documents)
    for split, (low, high) in STATEMENT_BUCKETS.items():
        evaluate.splits[split] = [p for p, n in phrased if n >= low and (high is None or n <= high)]
    prior = evaluate.relation_prior()
    return [f"{split}: {len(evaluate.splits[split])} stated facts said {low}{f'-{high}' if high else '+'} times "
            f"in the corpus, probed in its phrasing; relation prior {prior[split]:.3f}"
            for split, (low, high) in STATEMENT_BUCKETS.items()]


def shown_measures(args: argparse.Namespace) -> list[str]:
    """The curve keys the summary and the progress lines show."""
    return [*MEASURES, *(f"p_at_1_{split}" for split in STATEMENT_BUCKETS if args.by_statements)]


def summary(args: argparse.Namespace, settings: Settings, notes: list[str], runs: dict,
            complete: bool = True) -> list[str]:
    """summary.md: the run's settings, the suite's notes (common start, probes and their relation
    prior, step times), every evaluation of every variant made so far (`complete` False: the
    runs are not all done, said in an "incomplete" line) and the time-to-mark table (`mark_lines`)."""
    info = meta(settings, sys.argv[1:])
    measures = shown_measures(args)
    evaluated = sum(len(run.curve["probe_wall_s"]) for _, run in runs.values())
    lines = ["# Convergence horizon: one seed, a long budget", "",
             *([] if complete else [f"- incomplete: written after {evaluated} of {len(runs) * (args.evals + 1)} "
                                    "evaluations (each run's start and its planned ones; the runs were still going)"]),
             f"- device: {info['device']}; commit {info['commit']}{' (dirty)' if info['dirty'] else ''}, "
             f"date {info['date']}",
             f"- command: `benchmarks/convergence_horizon.py {' '.join(sys.argv[1:])}`",
             f"- seed {args.seed}, {args.budget_s:g} s of step time per variant, {args.evals} evaluations, "
             f"train.static_shapes {settings.static_shapes}, train.cuda_graphs {str(settings.cuda_graphs).lower()}",
             *(f"- {n}" for n in notes),
             "", "| variant | lr | steps | s/step | clock s | " + " | ".join(measures) + " |",
             "|---|---|---|---|---|" + "---|" * len(measures)]
    for label, (lr, run) in runs.items():
        clocks = run.curve["probe_wall_s"]
        for i, clock in enumerate(clocks):
            last = i == len(clocks) - 1  # steps and s/step once, on the run's final row
            lines.append(f"| {label} | {lr:g} | {run.steps if last else ''} | "
                         f"{f'{run.clock / run.steps:.2f}' if last and run.steps else ''} | {clock:.0f} | "
                         + " | ".join(f"{run.curve[m][i]:.3f}" for m in measures) + " |")
    return lines + mark_lines(runs, measures)


def crossing(clocks: list[float], values: list[float], target: float, lower_is_better: bool) -> float | None:
    """The clock at which a curve first meets `target`, linear between the two evaluations around it
    (the first clock when it starts there; None: never)."""
    sign = -1.0 if lower_is_better else 1.0
    for i, (clock, value) in enumerate(zip(clocks, values)):
        if sign * value >= sign * target:
            if i == 0:
                return clock
            before = values[i - 1]
            return clocks[i - 1] + (clock - clocks[i - 1]) * (target - before) / (value - before)
    return None


def lower_is_better(measure: str) -> bool:
    """The validation loss falls as a run learns; every P@1 rises."""
    return measure == "valid_mlm_loss"


def is_dense(label: str) -> bool:
    """A run label of `dense`: `dense`, or `dense@<lr>` where it runs at several rates."""
    return label == "dense" or label.startswith("dense@")


def dense_reference(curves: dict[str, dict]) -> str | None:
    """The label of the first `dense` run among `curves` (label -> curve); None without one, or when
    it has fewer than two evaluations."""
    reference = next((label for label in curves if is_dense(label)), None)
    return reference if reference is not None and len(curves[reference]["probe_wall_s"]) >= 2 else None


def times_to_mark(curves: dict[str, dict], reference: str, measure: str) -> tuple[float, dict[str, float | None]]:
    """The mark of `measure`, `suite_convergence.target_of` the reference's curve (80% of its gain from
    the start to its best evaluation; +-inf: no gain), and each curve's clock where it first meets it
    (`crossing`; None: never)."""
    lower = lower_is_better(measure)
    mark = sc.target_of(curves[reference][measure], lower)
    return mark, {label: crossing(c["probe_wall_s"], c[measure], mark, lower) for label, c in curves.items()}


def mark_lines(runs: dict, measures: list[str]) -> list[str]:
    """The time-to-mark table (`times_to_mark` against `dense_reference`): each run's clock where it
    meets the mark, interpolated between evaluations, and its ratio to the reference's. No lines
    without a dense run of at least two evaluations."""
    curves = {label: run.curve for label, (_, run) in runs.items()}
    reference = dense_reference(curves)
    if reference is None:
        return []
    marks, times = {}, {label: {} for label in runs}
    for m in measures:
        marks[m], per_run = times_to_mark(curves, reference, m)
        for label, t in per_run.items():
            times[label][m] = t

    def cell(label: str, m: str) -> str:
        t, t_ref = times[label][m], times[reference][m]
        if abs(marks[m]) == float("inf"):
            return "no mark"
        if t is None:
            return "not reached"
        return f"{t:.0f} s" + (f" ({t / t_ref:.2f}x)" if t_ref and label != reference else "")

    return ["", f"Time to the mark: 80% of `{reference}`'s gain from the start to its best evaluation, "
            "the clock interpolated between evaluations (ratio to its time):", "",
            "| variant | " + " | ".join(f"{m} {'<=' if lower_is_better(m) else '>='} {marks[m]:.3f}"
                                        for m in measures) + " |",
            "|---|" + "---|" * len(measures),
            *(f"| {label} | " + " | ".join(cell(label, m) for m in measures) + " |" for label in runs)]


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it: a kill mid-write leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, curves: dict, lines: list[str]) -> None:
    """DIR/curves.json and DIR/summary.md, each written atomically."""
    write_atomically(out / "curves.json", json.dumps(curves))
    write_atomically(out / "summary.md", "\n".join(lines) + "\n")


def progress(label: str, run: sc.Run, evals: int, measures: list[str]) -> str:
    """One stdout line on a run's latest evaluation: the label, the evaluation's number out of
    evals + 1 (the start's included), the run's clock and the measures."""
    clocks = run.curve["probe_wall_s"]
    return (f"[horizon] {label} eval {len(clocks)}/{evals + 1} clock {clocks[-1]:.1f} s: "
            + " ".join(f"{m} {run.curve[m][-1]:.3f}" for m in measures))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = run_labels(args.variant or [("dense", 1e-4), ("trelm", 3e-3)])
    name, plan = ("tiny", sc.QUICK["tiny"]) if args.quick else (args.dataset, sc.DATASETS[args.dataset])
    plan = replace(plan, budget_s=args.budget_s, evals=args.evals)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings.make(args.device, args.quick, args.out, probe_sample=args.probe_sample,
                             start_pack=args.start_pack, cuda_graphs=args.cuda_graphs,
                             static_shapes="always" if args.cuda_graphs else "never")
    results = Results()
    dataset = sc.DatasetRun(name, plan, {"dense": sc.VARIANTS["dense"],
                                         **{v: HORIZON_VARIANTS[v] for v, _ in variants.values()}},
                            (args.seed,), settings, results)
    if args.by_statements:
        for line in add_statement_splits(dataset.evaluate, dataset.data_dir):
            results.note(sc.SUITE, line)
    start = dataset.start(args.seed)
    dataset.calibrate(start)
    runs = {label: (lr, sc.Run(dataset.config(v, lr, args.seed, plan.budget_s), dataset.data_dirs[v],
                               settings.device, start, dataset.evaluate, plan.budget_s, plan.evals))
            for label, (v, lr) in variants.items()}
    curves = {f"{name}/{label}/seed{args.seed}": run.curve for label, (_, run) in runs.items()}
    notes = results.notes.get(sc.SUITE, [])

    def after_eval(label: str, run: sc.Run) -> None:
        write_results(args.out, curves, summary(args, settings, notes, runs, complete=False))
        print(progress(label, run, args.evals, shown_measures(args)), flush=True)

    sc.run_in_turns({label: run for label, (_, run) in runs.items()}, after_eval)
    lines = summary(args, settings, notes, runs)
    write_results(args.out, curves, lines)
    plot_convergence(curves, args.out / "horizon.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
