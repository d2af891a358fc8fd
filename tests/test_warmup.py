"""MLM-head warm-up (trelm_fast.warmup): only the head trains, the valid MLM loss falls, the result is cached."""
import json

import pytest
import torch
from transformers import AutoModelForMaskedLM

from trelm_fast.config import ModelConfig
from trelm_fast.model import build_mlm
from trelm_fast.warmup import REPORT, WarmupConfig, main, warm_up_head, warmup_dir

FAST = WarmupConfig(steps=6, batch_size=4, lr=3e-3, valid_batches=2)


@pytest.mark.slow
def test_warm_up_trains_only_the_head_and_is_cached(tmp_path, tiny_dir):
    out = warm_up_head("minilm", tiny_dir, tmp_path, FAST, log=lambda m: None)
    assert out == warmup_dir("minilm", tiny_dir, tmp_path, FAST) and out.parent == tmp_path
    report = json.loads((out / REPORT).read_text())
    assert report["after"]["valid_mlm_loss"] < report["before"]["valid_mlm_loss"]
    assert set(report["after"]["probes"]) == {"stated", "heldout"}

    warm = AutoModelForMaskedLM.from_pretrained(out)
    base = build_mlm(ModelConfig(path="minilm", init="pretrained"))
    changed = {n for n, p in warm.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(n.startswith("cls.predictions.") for n in changed), sorted(changed)
    assert "cls.predictions.decoder.weight" not in changed  # the tied word embeddings stay frozen

    mtime = (out / REPORT).stat().st_mtime_ns
    assert warm_up_head("minilm", tiny_dir, tmp_path, FAST, log=lambda m: pytest.fail("trained again")) == out
    assert (out / REPORT).stat().st_mtime_ns == mtime
    assert warmup_dir("minilm", tiny_dir, tmp_path, WarmupConfig(steps=7)) != out  # other settings, other dir


def test_cli_errors(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert f"error: {tmp_path / 'nothing'}: no dataset here (no manifest.json)" in capsys.readouterr().err
