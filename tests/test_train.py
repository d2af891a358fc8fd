"""The trainer end to end on the tiny synthetic dataset: methods, outputs, exact resume, NaN handling,
export + reload, command-line errors, dataset build on first use."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trelm_fast import train as train_mod
from trelm_fast.checkpoint import load_checkpoint

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=48",
        "model.max_position_embeddings=128", "model.dropout=0.1", "loss.num_negatives=5", "routing.m=3",
        "routing.fraction=0.25", "routing.refresh=2", "schedule.warmup_steps=1", "train.batch_size=4",
        "train.log_every=1"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they lose 10x to contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, data_dir, *extra, name="run"):
    """main() on the tiny model; returns (exit code, out_dir)."""
    out = tmp_path / name
    argv = TINY + [f"data.dir={data_dir}", f"out_dir={out}", *extra]
    return train_mod.main(argv), out


def metrics(out):
    """The last logged record of each step (a resumed run appends)."""
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records.setdefault(rec["step"], {}).update(rec)
    return records


def test_trelm_run_outputs_and_export(tmp_path, tiny_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForMaskedLM

    from trelm_fast import probe

    code, out = run(tmp_path, tiny_dir, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=1",
                    "train.eval_every=2")
    assert code == 0
    printed = capsys.readouterr().out
    assert "probe P@1 before training" in printed and "before 0.0" in printed and "wall-clock" in printed

    m = metrics(out)
    assert all(torch.isfinite(torch.tensor(m[s]["loss"])) and m[s]["tokens_per_s"] > 0 for s in (1, 2, 3, 4))
    assert "probe_stated/macro_p_at_1" in m[0] and "probe_heldout/macro_p_at_1" in m[2]  # before and periodic
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]  # keep_last=1
    assert (out / "paths.png").stat().st_size > 0

    ck = load_checkpoint(out / "checkpoints")
    assert ck.step == 4 and ck.config["method"]["name"] == "trelm" and ck.config["train"]["steps"] == 4
    assert ck.state["data"] == {"epoch": 0, "batch_in_epoch": 4}
    assert ck.state["bank"]["local"].shape[1] == 32 and ck.state["step"]["paths"] is not None

    # the export is a plain transformers model with the trained weights, and the probe CLI reads it
    plain = AutoModelForMaskedLM.from_pretrained(out / "model", local_files_only=True)
    trained = load_file(ck.path / "model.safetensors")
    for name, value in plain.state_dict().items():
        key = "mlm." + name
        if key in trained:
            assert torch.equal(value, trained[key]), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["nonfinite_total"] == 0
    assert probe.main(["--model", str(out / "model"), "--probes", str(tiny_dir / "probes.jsonl")]) == 0
    macro = [line for line in capsys.readouterr().out.splitlines() if line.startswith("macro")][0]
    assert float(macro.split()[-1]) == pytest.approx(summary["probe_after"], abs=5e-4)


@pytest.mark.parametrize("method", ["dense", "no_injection", "no_kmb", "no_routing"])
def test_methods_and_ablations_train(tmp_path, tiny_dir, method):
    code, out = run(tmp_path, tiny_dir, "train.steps=2", "--method", method)
    assert code == 0
    ck = load_checkpoint(out / "checkpoints")
    assert ck.config["method"]["name"] == method and ck.state["step"]["method"] == method
    assert ("bank" in ck.state) == (method != "no_kmb")
    assert all(torch.isfinite(torch.tensor(metrics(out)[s]["loss"])) for s in (1, 2))


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path, tiny_dir, monkeypatch):
    # 7 steps with refresh every 2 steps cross path refreshes, an LR decay and a checkpoint at step 3
    common = ("train.steps=7", "train.checkpoint_every=3")
    assert run(tmp_path, tiny_dir, *common, name="straight")[0] == 0

    save = train_mod.save_checkpoint

    def save_then_die(root, step, *args, **kwargs):
        path = save(root, step, *args, **kwargs)
        if step == 3:
            raise Interrupt
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupt):
        run(tmp_path, tiny_dir, *common, name="stopped")
    monkeypatch.undo()
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    assert train_mod.main(["--resume", str(tmp_path / "stopped" / "checkpoints")]) == 0

    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "stopped")
    for s in range(4, 8):
        for key in ("loss", "mlm_loss", "cka_loss", "lr"):
            assert resumed[s][key] == straight[s][key], (s, key)
    a, b = (load_checkpoint(tmp_path / r / "checkpoints") for r in ("straight", "stopped"))
    assert a.step == b.step == 7
    wa, wb = (load_file(c.path / "model.safetensors") for c in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for key in ("local", "global_mean", "counts", "entity_ids"):
        assert torch.equal(a.state["bank"][key], b.state["bank"][key]), key
    assert all(torch.equal(p, q) for p, q in zip(a.state["step"]["paths"], b.state["step"]["paths"]))
    # the path history (paths.png) spans the whole run, refreshes before the interruption included
    ha, hb = a.state["step"]["path_history"], b.state["step"]["path_history"]
    assert ha["steps"].tolist() == hb["steps"].tolist() == [0, 2, 4, 6]
    assert torch.equal(ha["masks"], hb["masks"])


def poisoned_steps(monkeypatch, bad_steps):
    """Make the real step see NaN weights at `bad_steps` (restored afterwards, as a glitch would be)."""
    real = train_mod.make_step

    def make(method, model, cfg):
        step = real(method, model, cfg)
        inner = step.step

        def step_fn(batch, step_index, epoch=0.0):
            if step_index not in bad_steps:
                return inner(batch, step_index, epoch)
            weight = model.mlm.get_input_embeddings().weight
            saved = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(float("nan"))
            try:
                return inner(batch, step_index, epoch)
            finally:
                with torch.no_grad():
                    weight.copy_(saved)

        step.step = step_fn
        return step

    monkeypatch.setattr(train_mod, "make_step", make)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, tiny_dir, monkeypatch, capsys):
    poisoned_steps(monkeypatch, {1, 2})
    code, out = run(tmp_path, tiny_dir, "train.steps=4", "train.max_nonfinite=3")
    assert code == 0
    m = metrics(out)
    assert [m[s]["nonfinite_total"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert json.loads((out / "summary.json").read_text())["nonfinite_total"] == 2
    assert "step 2: non-finite loss" in capsys.readouterr().out


def test_too_many_nonfinite_in_a_row_stop_the_run(tmp_path, tiny_dir, monkeypatch, capsys):
    poisoned_steps(monkeypatch, {1, 2, 3, 4, 5})
    code, out = run(tmp_path, tiny_dir, "train.steps=6", "train.max_nonfinite=3")
    assert code == 1
    assert "stopping at step 3: 3 non-finite losses in a row" in capsys.readouterr().err
    assert not (out / "model").exists()


def test_a_fresh_run_never_mixes_with_an_earlier_one(tmp_path, tiny_dir, capsys):
    assert run(tmp_path, tiny_dir, "train.steps=2")[0] == 0
    code, out = run(tmp_path, tiny_dir, "train.steps=1")
    assert code == 2 and "holds an earlier run" in capsys.readouterr().err
    assert load_checkpoint(out / "checkpoints").step == 2  # untouched
    code, out = run(tmp_path, tiny_dir, "train.steps=1", "--overwrite")
    assert code == 0 and sorted(metrics(out)) == [0, 1]  # only the new run's records
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]


@pytest.mark.parametrize("args, message", [
    (["--loss.theta", "1.5"], "loss.theta must be in [0, 1]"),
    (["kmb.gamma=1"], "kmb.gamma must be in (0, 1)"),
    (["--method", "sparse"], "method.name must be one of"),
    (["--train.stepz", "3"], "unknown field train.stepz"),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
    (["--resume", "/nonexistent"], "/nonexistent is neither a checkpoint"),
    (["positional"], "cannot parse 'positional'"),
])
def test_command_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_mod.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_larger_than_the_data_is_a_clear_error(tmp_path, tiny_dir, capsys):
    code, _ = run(tmp_path, tiny_dir, "train.batch_size=100000")
    assert code == 2
    assert "train.batch_size 100000 exceeds" in capsys.readouterr().err


def test_dataset_is_built_on_first_use(tmp_path, tiny_dir, monkeypatch):
    import trelm_fast.data.build as data_build

    calls = []

    def fake_build(out, config, progress=True, force=False):  # the data tests cover the real build
        calls.append((out, config, progress))
        shutil.copytree(tiny_dir, out)
        return {}

    monkeypatch.setattr(data_build, "build_source", fake_build)
    target = tmp_path / "cache" / "synthetic"
    code, _ = run(tmp_path, target, "train.steps=1", "data.build=true",
                  "--data.build_args", "{size: tiny, transe_epochs: 10, quiet: true}")
    assert code == 0
    assert calls == [(target, data_build.BuildConfig(source="synthetic", size="tiny", transe_epochs=10), False)]
    assert (target / "manifest.json").is_file()


def test_unknown_build_arg_is_a_config_error(tmp_path, capsys):
    code, _ = run(tmp_path, tmp_path / "cache", "data.build=true", "--data.build_args", "{sise: tiny}")
    assert code == 2
    assert "data.build_args" in capsys.readouterr().err


def test_script_entry_point_help():
    """`python trelm_fast/train.py` (the README command) runs as a script, not only as a module."""
    script = Path(train_mod.__file__).resolve()
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--resume" in proc.stdout and "--section.key VALUE" in proc.stdout


def test_zero_steps_probes_and_exports_the_starting_point(tmp_path, tiny_dir):
    """train.steps=0: the untrained model is probed on every split and exported (a baseline to compare)."""
    from transformers import AutoModelForMaskedLM

    code, out = run(tmp_path, tiny_dir, "train.steps=0")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 0 and set(summary["probes_after"]) == {"stated", "heldout"}
    assert summary["probes_after"] == summary["probes_before"]
    assert summary["probe_after"] == summary["probes_after"]["stated"]
    AutoModelForMaskedLM.from_pretrained(out / "model")
    assert not (out / "checkpoints").exists()
