"""train.report_to: metrics to TensorBoard and/or Weights & Biases (offline, no network) beside metrics.jsonl."""
import pytest

from test_train import metrics, run
from trelm_fast.config import ConfigError, load_config


@pytest.mark.slow
def test_wandb_offline_run_gets_the_logged_metrics_and_resume_continues_it(tmp_path, tiny_dir, monkeypatch):
    wandb = pytest.importorskip("wandb")  # in the `dev` extra; a GPU machine as it comes lacks it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, inits = [], []
    real_log, real_init = wandb.Run.log, wandb.init

    def log(self, data, step=None, **kw):  # what reaches the real run, recorded on the way
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kw)

    def init(**kw):
        inits.append(kw)
        return real_init(**kw)

    monkeypatch.setattr(wandb.Run, "log", log)
    monkeypatch.setattr(wandb, "init", init)
    sinks = ["train.report_to=[wandb]", "train.eval_every=100", "train.checkpoint_every=2"]
    code, out = run(tmp_path, tiny_dir, "train.steps=2", *sinks)
    assert code == 0
    m = metrics(out)
    assert [(s, d["loss"]) for s, d in logged if "loss" in d] == [(1, m[1]["loss"]), (2, m[2]["loss"])]
    assert any(d.get("probe_stated/macro_p_at_1") is not None for _, d in logged)
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")) and not (out / "tensorboard").exists()
    assert inits[0]["config"]["train"]["report_to"] == ["wandb"]

    code, _ = run(tmp_path, tiny_dir, "train.steps=3", *sinks, f"--resume={out / 'checkpoints'}")
    assert code == 0
    assert inits[1]["id"] == inits[0]["id"] == (out / "wandb_run_id").read_text()
    assert [s for s, d in logged if "loss" in d][-1] == 3


def test_unknown_sink_is_a_config_error():
    with pytest.raises(ConfigError, match="train.report_to must be one of tensorboard, wandb, got 'mlflow'"):
        load_config(None, ["train.report_to=[mlflow]"])
