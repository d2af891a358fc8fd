"""`python benchmarks/run.py [--suite all|kernels|step|convergence|limit] [--quick] [--device cpu|cuda] --out DIR`

Runs the suites, then writes DIR/results.json (`{"meta", "records"}`), DIR/summary.md, DIR/curves.json
(convergence curves) and the PNG plots. A suite whose part of trelm_fast is missing, or that fails,
is reported under "Failures" and on stderr, and the exit status is non-zero: no numbers are faked.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") is None:
    import torch as _torch

    if not _torch.cuda.is_available():  # the Triton kernels run interpreted on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"

import torch

from harness import SUITES, MissingComponent, Results, Settings, meta, to_json
from report import plot_convergence, plot_step_throughput, summary_markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("all", *SUITES), default="all")
    p.add_argument("--quick", action="store_true", help="smallest sizes and fewer repeats (about 2 minutes on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--case", action="append", default=None, metavar="GLOB",
                   help="run only cases matching this glob (repeatable), e.g. 'sparse_ffn-minilm-*' "
                        "(kernels and step; convergence always runs all its variants)")
    p.add_argument("--shape", action="append", default=None, choices=("tiny", "minilm", "bert-base"),
                   help="model shapes of the step and sparse_ffn cases (repeatable; default minilm and "
                        "bert-base, --quick minilm; tiny = 2 layers, d=64, for smoke tests)")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout of the step-suite models, the same for every variant (default 0.1 as in BERT; "
                        "the trainer's embedded default config uses 0.0)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    args = p.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def run_suite(name: str, settings: Settings, results: Results) -> None:
    import importlib

    importlib.import_module(f"suite_{name}").run(settings, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings.make(args.device, args.quick, args.out, args.case, args.shape, args.dropout)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    results = Results()
    info = meta(settings, suites)  # the commit and date of the code that runs
    info["load_average_1m_at_start"] = info.pop("load_average_1m")
    for name in suites:
        start = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            run_suite(name, settings, results)
        except MissingComponent as err:
            results.errors[name] = f"missing component: {err}"
        except Exception:  # report every failure, keep the other suites' figures
            results.errors[name] = traceback.format_exc()
        status = "FAILED" if name in results.errors else "done"
        print(f"[bench] {name} {status} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if name in results.errors:
            print(results.errors[name], file=sys.stderr)

    info["load_average_1m"] = os.getloadavg()[0]
    (args.out / "results.json").write_text(json.dumps(to_json(results, info), indent=1) + "\n")
    if results.curves:
        (args.out / "curves.json").write_text(json.dumps(results.curves) + "\n")
    plot_step_throughput(results, args.out / "step_throughput.png")
    plot_convergence(results.curves, args.out / "convergence.png")
    (args.out / "summary.md").write_text(summary_markdown(results, info))
    print(f"[bench] wrote {args.out}/results.json and summary.md", file=sys.stderr)
    if results.errors:
        print(f"[bench] FAILED suites: {', '.join(results.errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
