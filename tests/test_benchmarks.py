"""benchmarks/run.py: the measurement primitives, and `--quick` runs checked against the schema."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import (  # noqa: E402
    MAX_REPEATS, METRICS, MissingComponent, Results, Settings, count_flops, measure_many, peak_mem_mb, require,
    time_ms,
)

RECORD_KEYS = {"suite", "case", "variant", "metric", "value", "unit"}
STEP_TAGS = {"device", "precision", "p20_ms", "p50_ms", "p80_ms"}  # what they ran on, the wall-clock spread
SEED_TAGS = {"min", "max", "seeds"}  # convergence figures: the median over seeds and its spread


def test_flops_peak_memory_and_timing_measure_what_they_say(tmp_path):
    a, b = torch.randn(33, 17), torch.randn(17, 29)
    assert count_flops(lambda: a @ b) == 2 * 33 * 17 * 29

    def allocate_then_free():
        x = torch.ones(1 << 20)  # 4 MiB
        y = torch.ones(1 << 19)  # 2 MiB while x is alive
        del x, y
        return torch.ones(1 << 18)  # 1 MiB

    assert peak_mem_mb(allocate_then_free, torch.device("cpu")) == pytest.approx(6.0, rel=0.01)
    settings = Settings.make("cpu", quick=True, out=tmp_path)
    settings.min_time_s = 0.0
    calls = []
    assert time_ms(lambda: calls.append(1), settings) >= 0
    assert len(calls) == settings.warmup + settings.repeats
    settings.min_time_s = 60.0  # short calls are repeated up to MAX_REPEATS, not for a minute
    calls.clear()
    time_ms(lambda: calls.append(1), settings)
    assert len(calls) == settings.warmup + MAX_REPEATS


def test_profile_first_measures_memory_on_the_call_that_allocates_it(tmp_path):
    """Like a CUDA-graph capture: the first call builds a 4 MiB pool and a matmul, later calls reuse it."""
    a, b = torch.randn(33, 17), torch.randn(17, 29)
    pool = []

    def capture_then_replay():
        if not pool:
            pool.append(torch.ones(1 << 20))
            return a @ b
        return pool[0].add_(1)

    settings = Settings.make("cpu", quick=True, out=tmp_path)
    settings.min_time_s = 0.0
    first = measure_many(settings, {"step": capture_then_replay}, profile_first=True)["step"]
    assert first["flops"] == 2 * 33 * 17 * 29
    assert first["peak_mem_mb"] == pytest.approx(4.0, rel=0.01)
    pool.clear()  # the default counts on the first call and profiles a second one: the replay's 0 MiB
    assert measure_many(settings, {"step": capture_then_replay})["step"]["peak_mem_mb"] < 0.01


def test_results_reject_unknown_metrics_and_nan():
    results = Results()
    with pytest.raises(ValueError, match="unknown metric"):
        results.add("step", "minilm", "hf_dense", "speed", 1.0)
    with pytest.raises(ValueError, match="NaN"):
        results.add("step", "minilm", "hf_dense", "wall_ms", float("nan"))


def run_bench(out: Path, *args: str) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--device", "cpu", "--out", str(out), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    data = json.loads((out / "results.json").read_text())
    return proc.returncode, data, proc.stderr


def check_schema(data: dict) -> None:
    assert {"device", "versions", "commit", "date"} <= set(data["meta"])
    assert data["records"]
    for r in data["records"]:
        tags = {"step": STEP_TAGS, "convergence": SEED_TAGS if "/sweep" not in r["case"] else set()}
        assert set(r) == RECORD_KEYS | tags.get(r["suite"], set())
        assert r["unit"] == METRICS[r["metric"]]
        assert isinstance(r["value"], float)


def values(data: dict, **match) -> dict[tuple[str, str], float]:
    return {
        (r["variant"], r["metric"]): r["value"]
        for r in data["records"]
        if all(r[k] == v for k, v in match.items())
    }


def test_quick_kernels_entity_table_and_sparse_ffn(tmp_path):
    rc, data, err = run_bench(tmp_path, "--suite", "kernels", "--case", "entity_table",
                              "--case", "sparse_ffn-minilm-p10", "--case", "sparse_ffn_wgrad-minilm-p10")
    assert rc == 0, err
    check_schema(data)
    got = values(data, suite="kernels", case="entity_table")
    for variant in ("entity_table", "python_dict", "torch_searchsorted"):
        assert got[(variant, "lookups_per_s")] > 0
    assert got[("entity_table", "lookups_per_s")] > got[("python_dict", "lookups_per_s")]
    ffn = values(data, suite="kernels", case="sparse_ffn-minilm-p10")
    assert ffn[("sparse", "max_rel_err")] < 1e-5
    assert ffn[("sparse", "flops")] < ffn[("dense", "flops")]
    wgrad = values(data, suite="kernels", case="sparse_ffn_wgrad-minilm-p10")
    # dW1[S], dW2[:, S] at |S| = 10% of I: a tenth of the dense weight-gradient FLOPs
    assert wgrad[("sparse", "flops")] == pytest.approx(0.1 * wgrad[("dense", "flops")], rel=0.01)
    summary = (tmp_path / "summary.md").read_text()
    assert "| entity_table | python_dict | " in summary and "CPU figures" in summary
    assert "| sparse_ffn-minilm-p10 | dense | " in summary
    assert "| kernels: python_dict wall / entity_table wall >= 30 | " in summary  # the targets table


@pytest.mark.slow
def test_quick_all_suites_on_the_tiny_shape(tmp_path):
    rc, data, err = run_bench(tmp_path, "--suite", "all", "--shape", "tiny", "--case", "entity_table", "--case", "tiny",
                              "--case", "tiny/*")  # tiny/*: the convergence variants
    assert rc == 0, err
    check_schema(data)
    assert data["meta"]["quick"] and not data["meta"]["errors"]
    step = values(data, suite="step", case="tiny")
    for variant in ("hf_dense", "dense_opt", "frozen_dense", "trelm_naive", "trelm_fast"):
        for metric in ("wall_ms", "tokens_per_s", "flops", "peak_mem_mb"):
            assert step[(variant, metric)] > 0
        assert 0 < values(data, suite="limit", case="tiny")[(variant, "efficiency")]
    assert 0 < step[("trelm_fast", "attribution_share")] < 1
    assert step[("dense_opt", "flops")] < step[("hf_dense", "flops")]  # logits only at labelled positions
    assert step[("trelm_fast", "flops")] < step[("frozen_dense", "flops")]  # sparse FFN weight gradients
    final = values(data, suite="convergence", case="tiny/p_at_1_stated")
    assert {v for v, _ in final} == set(CONVERGENCE_VARIANTS)
    for name in ("summary.md", "step_throughput.png", "convergence.png", "curves.json"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| tiny | hf_dense | " in summary and "1.000 | 1.00x |" in summary


def test_step_suite_precision_batch_size_seq_len_and_variants(tmp_path):
    rc, data, err = run_bench(tmp_path, "--suite", "step", "--shape", "tiny", "--precision", "bf16",
                              "--batch-size", "3", "--seq-len", "40", "--variant", "hf_dense", "--variant", "trelm_fast")
    assert rc == 0, err
    check_schema(data)
    got = values(data, suite="step", case="tiny-bf16")
    assert {v for v, _ in got} == {"hf_dense", "trelm_fast"}
    assert all(r["precision"] == "bf16" and r["device"] == data["meta"]["device"] for r in data["records"])
    for r in data["records"]:  # the spread of the variant's (amortized) step, p50 = wall_ms
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        if r["metric"] == "wall_ms":
            assert r["p50_ms"] == pytest.approx(r["value"])
    assert got[("hf_dense", "tokens_per_s")] == pytest.approx(3 * 40 / (got[("hf_dense", "wall_ms")] / 1e3))
    assert data["meta"]["step_precision"] == "bf16"
    assert "batch 3 x 40 full-length sequences, bf16" in (tmp_path / "summary.md").read_text()
    for variant in ("hf_dense", "trelm_fast"):  # the step's own phase timers, named as the step names them
        note = next(n for n in data["meta"]["notes"]["step"] if n.startswith(f"tiny-bf16 {variant}:"))
        shares = dict(part.rsplit(" ", 1) for part in note[note.rindex("(") + 1:-1].split(", "))
        assert set(shares) == {"forward_backward", "optimizer", "bank", "other"}
        assert int(shares["forward_backward"].rstrip("%")) > 20


def test_step_diagnostic_freezes_the_embeddings_the_default_trains(tmp_path):
    import suite_step
    import workload

    settings = Settings.make("cpu", quick=True, out=tmp_path)
    words = {}
    for name in ("trelm_fast", "trelm_fast_frozen_embeddings"):
        variant = suite_step.Variant(settings, "tiny", name, workload.generated_dir(), 2, 40)
        trained = {n for n, p in variant.model.named_parameters() if p.requires_grad}
        assert not any(".attention." in n for n in trained)
        assert variant.routed and variant.refresh  # routed like trelm_fast: its paths were set and refreshed
        word = next(p for n, p in variant.model.named_parameters() if "word_embeddings" in n)
        before = word.detach().clone()
        variant.plain_step()
        words[name] = (word.requires_grad, torch.equal(before, word.detach()))
    assert words == {"trelm_fast": (True, False), "trelm_fast_frozen_embeddings": (False, True)}
    assert "trelm_fast_frozen_embeddings" not in suite_step.VARIANTS  # run only when --variant names it


def test_back_to_back_times_windows_of_plain_steps_per_step(tmp_path):
    import time

    import suite_step

    class Plain:  # a variant whose plain step takes at least `seconds`
        def __init__(self, name, seconds):
            self.name, self.seconds, self.calls = name, seconds, 0

        def plain_step(self):
            self.calls += 1
            time.sleep(self.seconds)

    variants = [Plain("a", 0.002), Plain("b", 0.004)]
    ms = suite_step.back_to_back(Settings.make("cpu", quick=True, out=tmp_path), variants)
    window = suite_step.BACK_TO_BACK
    assert all(v.calls % window == 0 and v.calls >= 2 * window for v in variants)  # whole windows, warm-up + timed
    assert 2.0 <= ms["a"] < 2.0 * window / 2 and 4.0 <= ms["b"]  # per step, not per window


def test_a_failing_suite_is_reported_and_fails_the_run(tmp_path, monkeypatch, capsys):
    import run

    def missing(name, settings, results):
        raise MissingComponent("trelm_fast.nothing has no thing")

    monkeypatch.setattr(run, "run_suite", missing)
    assert run.main(["--suite", "step", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["records"] == [] and "missing component" in data["meta"]["errors"]["step"]
    assert "## Failures" in (tmp_path / "summary.md").read_text()
    assert "FAILED" in capsys.readouterr().err
    with pytest.raises(MissingComponent, match="no_such_module"):
        require("trelm_fast.no_such_module")


def test_flops_inside_triton_kernels_are_counted_like_their_references():
    from trelm_fast.kernels.attribution import attribution_scores_reference, attribution_scores_triton
    from trelm_fast.kernels.sparse_ffn import gathered_tn_matmul_reference, gathered_tn_matmul_triton

    a, b, idx = torch.randn(19, 40), torch.randn(19, 24), torch.tensor([1, 4, 7, 30])
    for fn in (gathered_tn_matmul_reference, gathered_tn_matmul_triton):  # the kernel runs interpreted
        assert count_flops(lambda: fn(a, b, a_idx=idx, colsum=True)) == 2 * 4 * 24 * 19, fn.__name__
    grads, weights, w2, v = torch.randn(3, 5, 16), torch.full((3,), 1 / 3), torch.randn(16, 32), torch.randn(5, 32)
    ref = count_flops(lambda: attribution_scores_reference(grads, weights, w2, v))
    assert ref == 2 * 3 * 5 * 16 + 2 * 5 * 16 * 32
    assert count_flops(lambda: attribution_scores_triton(grads, weights, w2, v)) == ref


from suite_convergence import (INVESTIGATION, LR_WARMUP_SHARE, VARIANTS, first_reached, lr_warmup_steps,  # noqa: E402
                               selected_variants, spread, targets_from)

CONVERGENCE_VARIANTS = (*VARIANTS, *INVESTIGATION)


def test_quick_convergence_sweeps_seeds_and_both_probe_splits(tmp_path):
    rc, data, err = run_bench(tmp_path, "--suite", "convergence")
    assert rc == 0, err
    check_schema(data)
    conv = [r for r in data["records"] if r["suite"] == "convergence"]
    sweep = {(r["variant"], r["case"]) for r in conv if "/sweep lr=" in r["case"]}
    for variant in CONVERGENCE_VARIANTS:  # at least 3 learning rates each, every figure recorded
        assert len({case for v, case in sweep if v == variant}) >= 3
    for measure, metric in (("p_at_1_stated", "final_p_at_1"), ("p_at_1_heldout", "final_p_at_1"),
                            ("mlm_loss", "final_loss")):
        got = [r for r in conv if r["case"] == f"tiny/{measure}" and r["metric"] == metric]
        assert {r["variant"] for r in got} == set(CONVERGENCE_VARIANTS)
        for r in got:  # the median over the quick run's 2 seeds, with its spread
            assert r["seeds"] == "2" and float(r["min"]) <= r["value"] <= float(r["max"])
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert set(curves) == {f"tiny/{v}/seed{s}" for v in CONVERGENCE_VARIANTS for s in (0, 1)}
    for curve in curves.values():  # the start and at least one evaluation on the run's own clock
        assert len(curve["probe_wall_s"]) >= 2 and curve["probe_wall_s"][0] == 0.0
        assert len(curve["p_at_1_stated"]) == len(curve["p_at_1_heldout"]) == len(curve["probe_wall_s"])
    summary = (tmp_path / "summary.md").read_text()
    assert "common start = random-init tiny model + MLM-head warm-up" in summary
    assert "| tiny/p_at_1_heldout | no_injection | " in summary and "probes stated 61 facts, heldout 28 facts" in summary
    assert "step time (calibration, median of 3 steps) dense " in summary
    assert "P@1 of answering each relation's most common stated object: stated " in summary
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_convergence_lr_warmup_is_a_share_of_wall_clock_not_a_step_count():
    # 60 s at 2 s/step (dense) and at 0.5 s/step (trelm): both warm up for the same 10% of the budget
    dense, trelm = lr_warmup_steps(60.0, 2.0), lr_warmup_steps(60.0, 0.5)
    assert (dense, trelm) == (3, 12)
    assert dense * 2.0 == trelm * 0.5 == pytest.approx(LR_WARMUP_SHARE * 60.0)
    assert lr_warmup_steps(0.2, 5.0) == 1  # a budget shorter than a step still warms up for one step


def test_convergence_targets_come_from_dense_curve():
    dense = {"probe_wall_s": [0.0, 10.0, 20.0], "p_at_1_stated": [0.1, 0.3, 0.6], "p_at_1_heldout": [0.2, 0.2, 0.1],
             "valid_mlm_loss": [5.0, 4.0, 3.0]}
    targets = targets_from(dense)
    assert targets["p_at_1_stated"] == pytest.approx(0.1 + 0.8 * 0.5)
    assert targets["p_at_1_heldout"] == float("inf")  # dense did not improve: no target
    assert targets["mlm_loss"] == pytest.approx(5.0 - 0.8 * 2.0)
    other = {"probe_wall_s": [0.0, 4.0, 8.0], "p_at_1_stated": [0.1, 0.55, 0.2], "p_at_1_heldout": [0.2, 0.9, 0.9],
             "valid_mlm_loss": [5.0, 3.5, 3.45]}
    assert first_reached(other, targets) == {"p_at_1_stated": 4.0, "p_at_1_heldout": None, "mlm_loss": None}
    assert first_reached(dense, targets) == {"p_at_1_stated": 20.0, "p_at_1_heldout": None, "mlm_loss": 20.0}
    assert spread([3.0, 1.0, 2.0]) == {"value": 2.0, "min": "1.0", "max": "3.0", "seeds": "3"}


def test_convergence_case_selects_variants_and_keeps_dense(tmp_path):
    settings = Settings.make("cpu", quick=True, out=tmp_path)
    assert list(selected_variants("small", settings)) == list(CONVERGENCE_VARIANTS)
    settings.cases = ["small/trelm*"]
    assert set(selected_variants("small", settings)) == {"dense", "trelm", "trelm_refresh10", "trelm_objects"}
    assert selected_variants("wiki-geo", settings) == {}


def test_profile_step_reports_where_a_step_goes(tmp_path):
    import profile_step

    assert profile_step.main(["--out", str(tmp_path), "--device", "cpu", "--shape", "tiny", "--precision", "fp32",
                              "--variant", "dense_opt", "--variant", "trelm_fast", "--batch-size", "2",
                              "--seq-len", "32", "--steps", "2", "--refresh"]) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["device"].startswith("CPU") and set(report["variants"]) == {"dense_opt", "trelm_fast"}
    fast, dense = report["variants"]["trelm_fast"], report["variants"]["dense_opt"]
    assert fast["wall_ms"] > 0 and fast["ops"] > 100 and dense["ops"] > 100
    assert fast["launches"] == fast["syncs"] == fast["device_ms"] == 0  # CUDA-only figures
    assert fast["refresh_ops"] > fast["ops"] and "refresh_ops" not in dense  # a refresh attributes: more ops
    text = (tmp_path / "tiny-trelm_fast.txt").read_text()
    assert "top ops by host self time" in text and "one refresh step with paths set" in text

    graphed = tmp_path / "graphs"  # the same steps graphed (rehearsed on CPU): the same ops, named -graphs
    assert profile_step.main(["--out", str(graphed), "--device", "cpu", "--shape", "tiny", "--precision", "fp32",
                              "--variant", "trelm_fast", "--batch-size", "2", "--seq-len", "32", "--steps", "2",
                              "--cuda-graphs"]) == 0
    report = json.loads((graphed / "profile.json").read_text())
    assert report["cuda_graphs"] and report["variants"]["trelm_fast"]["ops"] > 100
    assert report["variants"]["trelm_fast"]["graph_launches"] == 0  # no capture on CPU
    assert (graphed / "tiny-graphs-trelm_fast.txt").is_file()


def test_model_type_builds_each_family_on_the_generated_base_model():
    import workload

    data_dir = workload.generated_dir()
    types = workload.model_types()
    assert {"bert", "roberta", "distilbert", "deberta-v2", "modernbert", "gpt2", "llama"} <= set(types)
    for model_type in types:
        if model_type == "electra":  # embedding_size 128 by default, hidden 64 at the tiny shape
            with pytest.raises(ValueError, match="word embeddings are 128 wide and its hidden states 64"):
                workload.build_step("trelm_fast", "tiny", data_dir, torch.device("cpu"), model_type=model_type)
            continue
        step, model = workload.build_step("trelm_fast", "tiny", data_dir, torch.device("cpu"), model_type=model_type)
        assert model.mlm.config.model_type == model_type
        assert model.mlm.config.vocab_size == 30522 and model.mlm.config.pad_token_id == 0
        assert model.causal == workload.is_causal(model_type) == (model_type in ("gpt2", "llama"))
    with pytest.raises(ValueError, match="--model-type must be one of .*roberta"):
        workload.family_base_model("gpt2-xl", data_dir)


def test_full_batch_of_a_decoder_is_causal():
    import workload

    data_dir = workload.generated_dir()
    masked, causal = (workload.full_batch(data_dir, 2, 32, causal=c) for c in (False, True))
    assert torch.equal(masked["cka_labels"], causal["cka_labels"])  # the same spans and targets
    ordinary = causal["cka_labels"].eq(-100)
    ordinary[:, [0, -1]] = False  # [CLS] and [SEP] are never labels
    assert torch.equal(causal["mlm_labels"].ne(-100), ordinary)  # every other token is an LM label
    assert torch.equal(causal["input_ids"].where(ordinary, 0), causal["mlm_labels"].where(ordinary, 0))  # unmasked
    assert masked["mlm_labels"].ne(-100).sum() < ordinary.sum()


@pytest.mark.parametrize("model_type, baseline", [("distilbert", "dense_opt"), ("gpt2", "hf_dense")])
def test_step_suite_runs_another_family(tmp_path, model_type, baseline):
    rc, data, err = run_bench(tmp_path, "--suite", "step", "--shape", "tiny", "--model-type", model_type,
                              "--variant", baseline, "--variant", "trelm_fast")
    assert rc == 0, err
    got = values(data, suite="step", case=f"tiny-{model_type}")
    assert got[("trelm_fast", "wall_ms")] > 0 and got[(baseline, "wall_ms")] > 0


def test_step_suite_refuses_an_unknown_family(tmp_path):
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--suite", "step", "--model-type",
                          "albert", "--out", str(tmp_path / "bad")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--model-type must be one of bert, " in bad.stderr


def test_convergence_horizon_runs_variants_at_given_rates(tmp_path, capsys):
    import convergence_horizon

    assert convergence_horizon.main(["--quick", "--out", str(tmp_path), "--budget-s", "0.2", "--evals", "2",
                                     "--variant", "trelm=1e-3", "--variant", "no_injection=3e-3",
                                     "--variant", "dense=1e-4", "--variant", "dense=3e-4"]) == 0
    curves = json.loads((tmp_path / "curves.json").read_text())  # one name at two rates: two runs, labelled
    assert set(curves) == {"tiny/trelm/seed0", "tiny/no_injection/seed0", "tiny/dense@0.0001/seed0",
                           "tiny/dense@0.0003/seed0"}
    for curve in curves.values():  # the common start, then evaluations on the run's own clock
        assert curve["probe_wall_s"][0] == 0.0 and len(curve["probe_wall_s"]) >= 2
        assert curve["loss_wall_s"][-1] >= 0.2
    summary = (tmp_path / "summary.md").read_text()
    assert "| trelm | 0.001 |" in summary and "| no_injection | 0.003 |" in summary
    assert "| dense@0.0001 | 0.0001 |" in summary and "| dense@0.0003 | 0.0003 |" in summary
    assert "most common stated object: stated " in summary and (tmp_path / "horizon.png").stat().st_size > 0
    assert "incomplete" not in summary and "Time to the mark: 80% of `dense@0.0001`'s gain" in summary
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[horizon] ")]
    assert len(progress) == sum(len(curve["probe_wall_s"]) for curve in curves.values())  # one per evaluation
    assert progress[0].startswith("[horizon] trelm eval 1/3 clock 0.0 s: p_at_1_stated ")
    with pytest.raises(SystemExit):
        convergence_horizon.main(["--quick", "--out", str(tmp_path), "--variant", "trelm"])  # no learning rate
    with pytest.raises(SystemExit, match="twice at the same rate"):
        convergence_horizon.main(["--quick", "--out", str(tmp_path), "--variant", "trelm=1e-3",
                                  "--variant", "trelm=0.001"])


def test_horizon_time_to_mark_interpolates_against_dense():
    from types import SimpleNamespace

    import convergence_horizon as ch

    assert ch.crossing([0, 100, 200], [0.1, 0.3, 0.5], 0.4, False) == pytest.approx(150.0)
    assert ch.crossing([0, 100, 200], [5.0, 3.0, 1.0], 2.0, True) == pytest.approx(150.0)
    assert ch.crossing([0, 100], [0.1, 0.2], 0.3, False) is None
    assert ch.crossing([0, 100], [0.1, 0.2], 0.1, False) == 0
    clocks = [0.0, 100.0, 200.0, 300.0]

    def run(p_at_1, loss):
        return 1e-3, SimpleNamespace(curve={"probe_wall_s": clocks, "p_at_1_stated": p_at_1, "valid_mlm_loss": loss})

    runs = {"dense@0.0003": run([0.0, 0.2, 0.4, 0.5], [5.0, 3.0, 2.0, 1.0]),
            "trelm": run([0.0, 0.5, 0.5, 0.5], [5.0, 4.0, 3.0, 2.0]),
            "flat": run([0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0])}
    lines = ch.mark_lines(runs, ["p_at_1_stated", "valid_mlm_loss"])
    assert "`dense@0.0003`" in lines[1]
    assert "| variant | p_at_1_stated >= 0.400 | valid_mlm_loss <= 1.800 |" in lines
    # dense meets P@1 0.4 at 200 s and loss 1.8 at 220 s; trelm meets the P@1 mark at 80 s, never the loss's
    assert "| dense@0.0003 | 200 s | 220 s |" in lines and "| trelm | 80 s (0.40x) | not reached |" in lines
    assert "| flat | not reached | not reached |" in lines
    assert ch.mark_lines({"trelm": runs["trelm"]}, ["p_at_1_stated"]) == []  # no dense run, no mark
    runs["dense@0.0003"][1].curve["p_at_1_stated"] = [0.0] * 4  # dense never improves: no mark
    assert "| trelm | no mark |" in ch.mark_lines(runs, ["p_at_1_stated"])


def test_horizon_seeds_compares_each_seed_with_its_own_dense(tmp_path):
    import json

    import horizon_seeds

    clocks = [0.0, 100.0, 200.0]

    def write(run_dir, curves):
        run_dir.mkdir()
        (run_dir / "curves.json").write_text(json.dumps(
            {key: {"probe_wall_s": clocks, "p_at_1_x": p_at_1} for key, p_at_1 in curves.items()}))

    # seed 0: dense's mark is 0.4 (80% of 0.5), met at 150 s; trelm meets it at 50 s (0.33x)
    write(tmp_path / "a", {"small/dense/seed0": [0.0, 0.3, 0.5], "small/trelm/seed0": [0.0, 0.8, 0.8]})
    # seed 1, another run directory: dense's mark 0.16 (80% of 0.2) at 160 s; trelm never
    write(tmp_path / "b", {"small/dense@0.0003/seed1": [0.0, 0.1, 0.2], "small/trelm/seed1": [0.0, 0.1, 0.1]})
    assert horizon_seeds.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out"),
                               "--measure", "p_at_1_x"]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| trelm | 50 s (0.33x) / 0.800 | not reached / 0.100 | 0.33x (0.33-0.33); not reached in 1 of 2 | 0.450 | 0.450 |" \
        in summary
    assert "| dense | 150 s / 0.500 |  |  | 0.500 | 0.400 |" in summary  # second half: the evaluations at 100, 200 s
    assert "| dense@0.0003 |  | 160 s / 0.200 |" in summary
    assert f"`small/trelm/seed1` {tmp_path / 'b'}" in summary and (tmp_path / "out" / "seeds.png").exists()
    write(tmp_path / "c", {"small/trelm/seed0": [0.0, 0.1, 0.2]})
    with pytest.raises(SystemExit, match=r"small/trelm/seed0 is in both .*a and .*c"):
        horizon_seeds.main([str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "out")])
    # a run made under an earlier name joins its variant's row; --variant leaves the others out
    write(tmp_path / "d", {"small/dense/seed2": [0.0, 0.5, 1.0], "small/old@0.001/seed2": [0.0, 0.9, 0.9],
                           "small/old@0.002/seed2": [0.0, 0.0, 0.0]})
    assert horizon_seeds.main([str(tmp_path / "a"), str(tmp_path / "d"), "--out", str(tmp_path / "out"),
                               "--measure", "p_at_1_x", "--label", "old@0.001=trelm", "--variant", "trelm"]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| trelm | 50 s (0.33x) / 0.800 | 89 s (0.56x) / 0.900 | 0.44x (0.33-0.56) | 0.850 | 0.850 |" in summary
    assert "old@" not in summary.split("## ")[1] and "| dense | 150 s / 0.500 | 160 s / 1.000 |" in summary
    with pytest.raises(SystemExit):
        horizon_seeds.main([str(tmp_path / "a"), "--out", str(tmp_path / "out"), "--label", "trelm"])
    with pytest.raises(SystemExit, match=r"missing/curves.json: no such file"):
        horizon_seeds.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


def test_horizon_diagnostics_change_only_what_they_name():
    import suite_convergence as sc
    import workload
    from trelm_fast.optim import configure_trainable
    from trelm_fast.models import parameter_group
    from trelm_fast.step import build_step_model, make_step

    data_dir = workload.generated_dir()
    base = workload.config("tiny", "trelm", data_dir)
    wider = workload.config("tiny", "trelm", data_dir, list(sc.DIAGNOSTICS["trelm_paths30"].overrides))
    assert (base.routing.fraction, wider.routing.fraction) == (0.1, 0.3)
    names = configure_trainable(build_step_model("trelm", base, data_dir).mlm, base.method.trainable)
    assert any("word_embeddings" in n for n in names) and not any(".attention." in n for n in names)
    cfg = workload.config("tiny", "trelm", data_dir, list(sc.DIAGNOSTICS["trelm_attention"].overrides))
    model = build_step_model("trelm", cfg, data_dir)
    with_attention = configure_trainable(model.mlm, cfg.method.trainable)
    assert set(with_attention) > set(names) and any(".attention." in n for n in with_attention)
    assert not any(".intermediate." in n for n in with_attention)  # the FFN still trains through its paths only
    mix = workload.config("tiny", "trelm", data_dir, list(sc.DIAGNOSTICS["trelm_theta08"].overrides))
    assert (base.loss.theta, mix.loss.theta) == (0.5, 0.8) and mix.routing == base.routing
    both = workload.config("tiny", "trelm", data_dir, list(sc.DIAGNOSTICS["trelm_theta08_paths30"].overrides))
    assert (both.loss.theta, both.routing) == (mix.loss.theta, wider.routing)
    chance = workload.config("tiny", "trelm", data_dir, list(sc.DIAGNOSTICS["trelm_random_paths"].overrides))
    assert chance.routing.rule == "random" and chance.routing.fraction == base.routing.fraction
    cfg = workload.config("tiny", "trelm", data_dir, list(sc.DIAGNOSTICS["trelm_frozen_embeddings"].overrides))
    frozen = configure_trainable(build_step_model("trelm", cfg, data_dir).mlm, cfg.method.trainable)
    assert set(frozen) == {n for n in names if "embeddings" not in n}
    faster = workload.config("tiny", "trelm", data_dir, list(sc.DIAGNOSTICS["trelm_slice_lr2"].overrides))
    assert (base.optim.slice_lr_scale, faster.optim.slice_lr_scale) == (1.0, 2.0) and faster.optim.lr == base.optim.lr
    whole_ffn = sc.DIAGNOSTICS["frozen_dense"]
    cfg = workload.config("tiny", whole_ffn.method, data_dir, list(whole_ffn.overrides))
    step = make_step(whole_ffn.method, build_step_model(whole_ffn.method, cfg, data_dir), cfg)
    trained = {n for n, p in step.model.mlm.named_parameters() if p.requires_grad}
    groups = {parameter_group(n) for n in trained}
    assert set(names) < trained and groups == {"embeddings", "head", "ffn"}  # attention and layer norms frozen
    assert not set(sc.DIAGNOSTICS) & set(sc.ALL_VARIANTS)  # the suite does not run them


def test_convergence_horizon_under_cuda_graphs_graphs_every_run(tmp_path, monkeypatch):
    import convergence_horizon

    graphed = []
    run_in_turns = convergence_horizon.sc.run_in_turns

    def record(runs, after_eval=None):
        run_in_turns(runs, after_eval)
        graphed.extend((label, run.step.graphs is not None and run.step.graphs.entries != {})
                       for label, run in runs.items())

    monkeypatch.setattr(convergence_horizon.sc, "run_in_turns", record)
    assert convergence_horizon.main(["--quick", "--out", str(tmp_path), "--budget-s", "0.3", "--evals", "1",
                                     "--variant", "trelm=1e-3", "--variant", "dense=1e-4", "--cuda-graphs"]) == 0
    assert graphed == [("trelm", True), ("dense", True)]  # each run's plain steps went through its graphs
    assert "train.static_shapes always, train.cuda_graphs true" in (tmp_path / "summary.md").read_text()


def test_run_in_turns_reports_each_evaluation_once_as_it_is_made():
    import suite_convergence as sc

    class Counting:
        """A stand-in `sc.Run`: evaluated at its start (or not), then every `every` steps, done after `steps`."""

        def __init__(self, every: int, steps: int, start: bool = True):
            self.curve = {"probe_wall_s": [0.0] if start else []}
            self.every, self.budget, self.steps = every, steps, 0

        @property
        def done(self):
            return self.steps >= self.budget

        def advance(self):
            self.steps += 1
            if self.steps % self.every == 0:
                self.curve["probe_wall_s"].append(float(self.steps))

    runs = {"a": Counting(2, 5), "b": Counting(3, 6), "c": Counting(4, 4, start=False)}
    seen = []
    sc.run_in_turns(runs, lambda label, run: seen.append((label, list(run.curve["probe_wall_s"]))))
    assert seen == [("a", [0.0]), ("b", [0.0]),  # the start's, then in the order the turns made them
                    ("a", [0.0, 2.0]), ("b", [0.0, 3.0]), ("a", [0.0, 2.0, 4.0]), ("c", [4.0]),
                    ("b", [0.0, 3.0, 6.0])]
    assert all(r.done for r in runs.values())


def test_convergence_horizon_cut_off_keeps_the_finished_evaluations(tmp_path, monkeypatch, capsys):
    import convergence_horizon
    import suite_convergence as sc

    class CutOff(Exception):
        """Stands for a time limit killing the run."""

    evaluate, calls = sc.Evaluator.__call__, []

    def cut_off_at_the_third(self, mlm):  # 1: the common start, 2: a run's first evaluation, 3: cut off
        calls.append(mlm)
        if len(calls) == 3:
            raise CutOff
        return evaluate(self, mlm)

    monkeypatch.setattr(sc.Evaluator, "__call__", cut_off_at_the_third)
    with pytest.raises(CutOff):
        convergence_horizon.main(["--quick", "--out", str(tmp_path), "--budget-s", "0.2", "--evals", "2",
                                  "--variant", "trelm=1e-3", "--variant", "dense=1e-4"])
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert sorted(len(c["probe_wall_s"]) for c in curves.values()) == [1, 2]  # both starts, one evaluation
    assert max(c["probe_wall_s"][-1] for c in curves.values()) >= 0.1
    summary = (tmp_path / "summary.md").read_text()
    assert "- incomplete: written after 3 of 6 evaluations" in summary
    rows = [row for row in summary.splitlines() if row.startswith(("| trelm | 0.001 |", "| dense | 0.0001 |"))]
    assert len(rows) == 3
    assert not (tmp_path / "horizon.png").exists() and not list(tmp_path.glob(".*.tmp"))
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[horizon] ")]
    assert len(progress) == 3 and any(" eval 2/3 " in line for line in progress)


def test_convergence_horizon_by_statements_partitions_the_stated_facts(tmp_path):
    import convergence_horizon

    assert convergence_horizon.main(["--quick", "--out", str(tmp_path), "--budget-s", "0.1", "--evals", "1",
                                     "--variant", "trelm=1e-3", "--by-statements"]) == 0
    curve = json.loads((tmp_path / "curves.json").read_text())["tiny/trelm/seed0"]
    summary = (tmp_path / "summary.md").read_text()
    said = {split: int(re.search(rf"{re.escape(split)}: (\d+) stated facts said", summary).group(1))
            for split in convergence_horizon.STATEMENT_BUCKETS}
    stated = int(re.search(r"probes stated (\d+) facts", summary).group(1))
    assert sum(said.values()) == stated and said["said_1-2"] > 0  # every stated fact falls in one bucket
    for split in convergence_horizon.STATEMENT_BUCKETS:
        assert len(curve[f"p_at_1_{split}"]) == len(curve["probe_wall_s"]) and f"p_at_1_{split}" in summary


def test_convergence_runs_from_a_start_pack_without_building(tmp_path, monkeypatch):
    import start_pack
    import suite_convergence as sc
    from safetensors.torch import load_file

    pack = start_pack.write_pack(tmp_path / "pack", "tiny", quick=True)
    warm = sc.warm_start(sc.QUICK["tiny"], sc.dataset(sc.QUICK["tiny"], {}), print)[0]
    packed = load_file(str(pack / "start" / start_pack.WEIGHTS))
    assert all(t.dtype == torch.float16 for t in packed.values() if t.is_floating_point())

    def no_build(*args):
        raise AssertionError("a run from a start pack built something")

    monkeypatch.setattr(sc, "dataset", no_build)
    monkeypatch.setattr(sc, "warm_start", no_build)
    settings = Settings.make("cpu", quick=True, out=tmp_path, cases=["tiny/trelm"], start_pack=tmp_path / "pack")
    results = Results()
    sc.run(settings, results)
    assert set(results.curves) == {f"tiny/{v}/seed{s}" for v in ("dense", "trelm") for s in sc.QUICK_SEEDS}
    assert any("from the start pack" in n and "float16" in n for n in results.notes["convergence"])
    restored, original = (load_file(str(d / start_pack.WEIGHTS)) for d in (pack / "start-fp32", warm))
    assert restored.keys() == original.keys()
    for name, t in original.items():  # the start is the warm-up rounded to float16, nothing else
        assert restored[name].dtype == t.dtype and torch.equal(restored[name], t.half().to(t.dtype))

    with pytest.raises(SystemExit, match="no dataset"):
        start_pack.open_pack(tmp_path / "pack", "tiny").dataset("bench-nothing")
    monkeypatch.undo()
    monkeypatch.setattr(start_pack, "CARRY_LIMIT_BYTES", 1000)
    with pytest.raises(SystemExit, match="over the device tool's"):
        start_pack.write_pack(tmp_path / "big", "tiny", quick=True)
