"""Resume cannot lose or corrupt a run (issue 16): where a resumed run writes, checkpoint checksums on
resume, the same-run checks, metrics after a resume, and the one-line exit-2 errors of the trainer."""
import json
import shutil

import pytest
import torch

from test_checkpoint import DAMAGE
from test_train import TINY, metrics, one_thread, run  # noqa: F401 (one_thread: an autouse fixture)
from trelm_fast import train as train_mod
from trelm_fast.checkpoint import checkpoint_dirs, load_checkpoint
from trelm_fast.data.checksums import file_checksums, sha256_file


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dir):
    """A 2-step run with checkpoints at steps 1 and 2 (copied by each test that changes it). It was
    moved after the run, so the out_dir its configs name no longer exists: a trainer that followed
    that out_dir (the old code) could not damage this run for the other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    code, out = run(tmp_path_factory.mktemp("finished"), tiny_dir, *TWO_STEPS, name="ran_here")
    torch.set_num_threads(threads)
    assert code == 0
    return out.rename(out.with_name("moved_here"))


TWO_STEPS = ("train.steps=2", "train.checkpoint_every=1")


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def fingerprint(run_dir):
    """Every file under a run directory with its sha256: what must stay untouched."""
    return {str(p.relative_to(run_dir)): sha256_file(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def exit_code(*argv):
    """main()'s exit status, whether it returns it or (command-line errors) exits with it."""
    try:
        return train_mod.main(list(argv))
    except SystemExit as exc:
        return exc.code


def resume(path, *extra):
    return exit_code("--resume", str(path), *extra)


def last_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_resume_from_a_copy_writes_only_into_the_copy(tmp_path, tiny_dir):
    assert run(tmp_path, tiny_dir, *TWO_STEPS, name="original")[0] == 0
    original = tmp_path / "original"
    copied = copy_run(original, tmp_path / "copy")
    # the copy's checkpoints still name the original in their config.yaml
    assert load_checkpoint(copied / "checkpoints").config["out_dir"] == str(original)
    before = fingerprint(original)
    assert resume(copied / "checkpoints", "train.steps=4", "train.keep_checkpoints=1") == 0
    assert fingerprint(original) == before
    assert [p.name for p in checkpoint_dirs(copied / "checkpoints")] == ["step_00000004"]
    assert load_checkpoint(copied / "checkpoints").config["out_dir"] == str(copied)


def test_a_checkpoint_config_naming_another_out_dir_cannot_redirect_deletions(tmp_path, tiny_dir):
    assert run(tmp_path, tiny_dir, *TWO_STEPS, name="victim")[0] == 0
    moved = tmp_path / "moved"
    (tmp_path / "victim").rename(moved)
    victim = tmp_path / "victim"  # what the checkpoint's config.yaml names: now someone else's files
    (victim / "checkpoints" / "step_00000001").mkdir(parents=True)
    (victim / "checkpoints" / "step_00000001" / "keep.txt").write_text("x")
    (victim / "model").mkdir()
    (victim / "model" / "keep.txt").write_text("y")
    for ck_dir in checkpoint_dirs(moved / "checkpoints"):
        assert load_checkpoint(ck_dir).config["out_dir"] == str(victim)
    before = fingerprint(victim)
    assert resume(moved / "checkpoints", "train.steps=3", "train.keep_checkpoints=1") == 0
    assert fingerprint(victim) == before
    other = tmp_path / "other.yaml"  # nor can a --config that names it
    other.write_text((moved / "checkpoints" / "step_00000003" / "config.yaml").read_text()
                     .replace(str(moved), str(victim)))
    assert resume(moved / "checkpoints", "--config", str(other), "train.steps=4", "train.keep_checkpoints=1") == 0
    assert fingerprint(victim) == before
    assert [p.name for p in checkpoint_dirs(moved / "checkpoints")] == ["step_00000004"]


def test_an_explicit_out_dir_on_resume_must_be_new_or_forced(tmp_path, finished_run, capsys):
    src = copy_run(finished_run, tmp_path / "src")
    busy = copy_run(finished_run, tmp_path / "busy")
    before = fingerprint(busy)
    assert resume(src / "checkpoints", f"out_dir={busy}", "train.steps=3") == 2
    assert "holds an earlier run" in last_error(capsys)
    assert fingerprint(busy) == before
    # --overwrite never removes the checkpoint being resumed from (here one kept in an out_dir's model/)
    kept = tmp_path / "elsewhere" / "model" / "step_00000002"
    shutil.copytree(src / "checkpoints" / "step_00000002", kept)
    assert resume(kept, f"out_dir={tmp_path / 'elsewhere'}", "--overwrite") == 2
    assert f"holds {kept}, the checkpoint to resume from" in last_error(capsys) and kept.is_dir()
    new = tmp_path / "branch"
    assert resume(src / "checkpoints", f"out_dir={new}", "train.steps=3") == 0
    assert load_checkpoint(new / "checkpoints").step == 3
    assert sorted(metrics(new)) == [0, 1, 2, 3]  # the earlier records come along, each step once
    assert [p.name for p in checkpoint_dirs(src / "checkpoints")] == ["step_00000001", "step_00000002"]


def test_damaged_latest_checkpoint_on_resume_is_named_and_previous_offered(tmp_path, finished_run, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    DAMAGE["weights overwritten"][0](out / "checkpoints" / "step_00000002")
    assert resume(out / "checkpoints", "train.steps=3") == 2
    message = capsys.readouterr().err
    assert f"{out / 'checkpoints' / 'step_00000002' / 'model.safetensors'}: checksum mismatch" in message
    assert f"--resume {out / 'checkpoints' / 'step_00000001'}" in message
    assert "Traceback" not in message
    assert resume(out / "checkpoints" / "step_00000001", "train.steps=3") == 0  # when asked for by name
    assert load_checkpoint(out / "checkpoints").step == 3


def other_entities(tiny_dir, out):
    """A copy of the tiny dataset whose entity rows are in another order (a consistent manifest)."""
    shutil.copytree(tiny_dir, out)
    ids = (out / "entities.txt").read_text().splitlines()
    (out / "entities.txt").write_text("\n".join(ids[::-1]) + "\n")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] = file_checksums(out, list(manifest["files"]))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_resume_with_another_dataset_is_refused(tmp_path, tiny_dir, finished_run, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    other = other_entities(tiny_dir, tmp_path / "other_data")
    assert resume(out / "checkpoints", f"data.dir={other}", "train.steps=3") == 2
    assert f"data.dir {other} is not the dataset" in last_error(capsys)
    assert load_checkpoint(out / "checkpoints").step == 2


@pytest.mark.parametrize("setting, value", [("train.batch_size", 2), ("train.batch_size", 8), ("seed", 7)])
def test_resume_with_another_batch_size_or_seed_needs_allow_change(tmp_path, finished_run, capsys, setting, value):
    out = copy_run(finished_run, tmp_path / "run")
    assert resume(out / "checkpoints", f"{setting}={value}", "train.steps=3") == 2
    error = last_error(capsys)
    assert f"{setting} is {value}, but" in error and f"--allow-change {setting}" in error
    assert resume(out / "checkpoints", f"{setting}={value}", "train.steps=3", "--allow-change", setting) == 0
    ck = load_checkpoint(out / "checkpoints")
    assert ck.step == 3 and ck.state["run"][setting] == value


@pytest.mark.parametrize("setting, value", [("model.hidden_size", 48), ("model.num_layers", 3),
                                            ("method.name", "dense"), ("method.name", "no_kmb")])
def test_model_or_method_changed_on_resume_is_a_clear_error(tmp_path, finished_run, capsys, setting, value):
    out = copy_run(finished_run, tmp_path / "run")
    extra = ["model.intermediate_size=96"] if setting == "model.hidden_size" else []
    assert resume(out / "checkpoints", f"{setting}={value}", *extra) == 2
    error = last_error(capsys)
    assert error.startswith("error: ") and setting in error and "cannot change within a run" in error
    assert resume(out / "checkpoints", f"{setting}={value}", "--allow-change", setting) == 2
    assert f"--allow-change {setting}: only train.batch_size, seed may change" in last_error(capsys)


def test_metrics_have_each_step_once_after_a_resume(tmp_path, tiny_dir, monkeypatch):
    log = train_mod.Metrics.log

    def log_then_die(self, step, values):  # killed after logging step 5, past the checkpoint at 3
        log(self, step, values)
        if step == 5 and "loss" in values:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.Metrics, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_dir, "train.steps=6", "train.checkpoint_every=3")
    monkeypatch.undo()
    assert resume(tmp_path / "run" / "checkpoints") == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def changed_dataset(tiny_dir, out):
    shutil.copytree(tiny_dir, out)
    data = bytearray((out / "train_tokens.npy").read_bytes())
    data[-1] ^= 1
    (out / "train_tokens.npy").write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("case", ["dataset checksum", "dataset file missing", "max_position_embeddings", "device cuda",
                                  "missing data.dir"])
def test_user_errors_are_one_line_with_exit_2(tmp_path, tiny_dir, capsys, monkeypatch, case):
    import trelm_fast.data.build as data_build

    builds = []
    monkeypatch.setattr(data_build, "build_source", lambda *a, **k: builds.append(a))
    data_dir, extra, expected = tiny_dir, [], ""
    if case == "dataset checksum":
        data_dir = changed_dataset(tiny_dir, tmp_path / "changed")
        expected = f"{data_dir / 'train_tokens.npy'}: checksum mismatch"
    elif case == "dataset file missing":
        data_dir = tmp_path / "incomplete"
        shutil.copytree(tiny_dir, data_dir)
        (data_dir / "kg_embeddings.safetensors").unlink()
        expected = f"{data_dir / 'kg_embeddings.safetensors'}: listed in {data_dir / 'manifest.json'} but missing"
    elif case == "max_position_embeddings":
        extra, expected = ["model.max_position_embeddings=64"], "model.max_position_embeddings is 64"
    elif case == "device cuda":
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        extra, expected = ["device=cuda"], "device: 'cuda' asked for"
    else:
        data_dir, expected = tmp_path / "data_chache" / "synthetic", "set data.build: true"
    assert exit_code(*TINY, f"data.dir={data_dir}", f"out_dir={tmp_path / 'run'}", "train.steps=1", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and "Traceback" not in "\n".join(err)
    assert builds == [] and not (tmp_path / "data_chache").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_another_world_size_is_refused(tmp_path, finished_run):
    ck = load_checkpoint(finished_run / "checkpoints")
    now = dict(ck.state["run"], world_size=2)
    for allow in (set(), {"world_size"}):
        with pytest.raises(train_mod.ConfigError, match=r"world_size is 2, but .* with 1; it cannot change|"
                                                        r"--allow-change world_size: only"):
            train_mod.check_same_run(ck, now, allow, tmp_path)
    train_mod.check_same_run(ck, dict(ck.state["run"]), set(), tmp_path)  # the same run passes
