"""TrelmTrainer: TRELM steps inside transformers.Trainer (parity with train.py, resume, datasets input)."""
import json
from pathlib import Path

import pytest
import torch

from test_train import TINY, metrics
from trelm_fast import train as train_mod
from trelm_fast.checkpoint import CheckpointError
from trelm_fast.hf import TrelmArguments, TrelmTrainer, to_hf_dataset

STEPS = 20
# what the two loops share: no dropout (the global RNG is drawn differently), no warm-up (the
# Trainer's linear warm-up starts at 0, train.py's at lr / W), no clipping, weight decay 0.01
SHARED = ["model.dropout=0.0", "schedule.warmup_steps=0", "schedule.kind=linear"]


def trainer_args(tmp_path, tiny_dir, **kw) -> TrelmArguments:
    defaults = dict(output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=4,
                    learning_rate=1e-3, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=0,
                    max_grad_norm=0.0, seed=0, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                    disable_tqdm=True, trelm_overrides=TINY + SHARED + [f"data.dir={tiny_dir}"])
    return TrelmArguments(**{**defaults, **kw})


def recorded(trainer) -> list[float]:
    """Per-optimizer-step losses of ``trainer`` (sum of its micro-batch losses), recorded as it trains."""
    losses, inner = [], trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        loss = inner(model, inputs, num_items_in_batch)
        losses.append(float(loss))
        return loss

    trainer.training_step = training_step
    return losses


@pytest.mark.parametrize("steps, train_py, hf", [
    (STEPS, [], {}),
    (6, ["train.batch_size=2", "train.grad_accum_steps=2", "train.max_grad_norm=0.5"],
     dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.5)),
], ids=["plain", "accumulation+clipping"])
def test_parity_with_train_py(tmp_path, tiny_dir, steps, train_py, hf):
    """Same seed, data and settings: the same loss at every step (rel 1e-5; bitwise here)."""
    out = tmp_path / "train_py"
    argv = TINY + SHARED + [f"data.dir={tiny_dir}", f"out_dir={out}", f"train.steps={steps}", "train.eval_every=1000",
                            "train.checkpoint_every=1000", *train_py]
    assert train_mod.main(argv) == 0
    want = [metrics(out)[s]["loss"] for s in range(1, steps + 1)]

    trainer = TrelmTrainer(args=trainer_args(tmp_path, tiny_dir, max_steps=steps, **hf))
    got = recorded(trainer)
    trainer.train()
    k = hf.get("gradient_accumulation_steps", 1)
    assert [sum(got[i:i + k]) for i in range(0, len(got), k)] == pytest.approx(want, rel=1e-5)
    assert trainer.trelm_step.router.history.masks  # paths were refreshed (every 2 steps in TINY)
    if hf.get("max_grad_norm"):
        assert all(trainer.state.log_history[i]["grad_norm"] > 0 for i in range(len(trainer.state.log_history) - 1))


def test_resume_continues_exactly(tmp_path, tiny_dir):
    """10 steps straight == 5 steps, a checkpoint, and a new trainer resuming from it for 5 more."""
    straight = TrelmTrainer(args=trainer_args(tmp_path / "a", tiny_dir, max_steps=10))
    want = recorded(straight)
    straight.train()

    first = TrelmTrainer(args=trainer_args(tmp_path / "b", tiny_dir, max_steps=10, save_strategy="steps", save_steps=5))
    got = recorded(first)
    first.train()
    ck = tmp_path / "b" / "hf" / "checkpoint-5"
    assert (ck / "trelm_state.safetensors").is_file() and (ck / "model" / "config.json").is_file()
    resumed = TrelmTrainer(args=trainer_args(tmp_path / "b", tiny_dir, max_steps=10))
    got_resumed = recorded(resumed)
    resumed.train(resume_from_checkpoint=str(ck))
    assert got_resumed == pytest.approx(want[5:], rel=1e-6) and got[:5] == pytest.approx(want[:5], rel=1e-6)
    for (n, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, msg=n)
    torch.testing.assert_close(resumed.model.bank.local, straight.model.bank.local)


def test_incomplete_checkpoint_is_refused(tmp_path, tiny_dir):
    trainer = TrelmTrainer(args=trainer_args(tmp_path, tiny_dir, max_steps=2, save_strategy="steps", save_steps=2))
    trainer.train()
    ck = tmp_path / "hf" / "checkpoint-2"
    (ck / "trelm_state.json").unlink()
    again = TrelmTrainer(args=trainer_args(tmp_path, tiny_dir, max_steps=4))
    with pytest.raises(FileNotFoundError, match=r"checkpoint-2: not a complete TrelmTrainer checkpoint "
                                                r"\(missing trelm_state.json\)"):
        again.train(resume_from_checkpoint=str(ck))


def test_changed_checkpoint_file_is_named(tmp_path, tiny_dir):
    """Every file of checkpoint-N (the Trainer's optimizer state too) is checked against
    trelm_checksums.json before anything is loaded."""
    trainer = TrelmTrainer(args=trainer_args(tmp_path, tiny_dir, max_steps=2, save_strategy="steps", save_steps=2))
    trainer.train()
    ck = tmp_path / "hf" / "checkpoint-2"
    listed = json.loads((ck / "trelm_checksums.json").read_text())
    assert {"optimizer.pt", "trainer_state.json", "trelm_model.safetensors", "trelm_state.safetensors"} <= set(listed)
    with open(ck / "optimizer.pt", "r+b") as f:  # one byte changed after the save
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = TrelmTrainer(args=trainer_args(tmp_path, tiny_dir, max_steps=4))
    with pytest.raises(CheckpointError, match=r"optimizer.pt.*checksum mismatch with .*trelm_checksums.json"):
        again.train(resume_from_checkpoint=str(ck))
    (ck / "trelm_checksums.json").unlink()
    with pytest.raises(CheckpointError, match=r"trelm_checksums.json is missing: .* earlier trelm_fast"):
        again.train(resume_from_checkpoint=str(ck))


def test_datasets_input_trains_like_the_trelm_dataset(tmp_path, tiny_dir):
    rows = to_hf_dataset(tiny_dir)
    assert rows.column_names == ["index", "input_ids", "length", "spans", "si"] and len(rows) > 8
    losses = []
    for name, ds in (("trelm", None), ("datasets", rows)):
        trainer = TrelmTrainer(args=trainer_args(tmp_path / name, tiny_dir, max_steps=3), train_dataset=ds)
        losses.append(recorded(trainer))
        trainer.train()
    assert losses[1] == losses[0]
    with pytest.raises(ValueError, match=r"train_dataset has no column\(s\) \['spans', 'si'\]"):
        TrelmTrainer(args=trainer_args(tmp_path / "x", tiny_dir), train_dataset=rows.remove_columns(["spans", "si"])
                     ).get_train_dataloader()


RANK_SCRIPT = '''
import sys
import torch
from safetensors.torch import save_file
from transformers import HfArgumentParser
from trelm_fast.hf import TrelmArguments, TrelmTrainer

(args,) = HfArgumentParser(TrelmArguments).parse_args_into_dataclasses(sys.argv[2:])
trainer = TrelmTrainer(args=args)
losses = []
inner = trainer.training_step
trainer.training_step = lambda m, i, n=None: losses.append(inner(m, i, n)) or losses[-1]
trainer.train()
step = trainer.trelm_step
out = {"model/" + k: v.clone() for k, v in trainer.model.state_dict().items()}  # clones: tied weights
out.update({"bank/local": step.model.bank.local, "losses": torch.stack(losses)})
out.update({f"path/{i}": p for i, p in enumerate(step.paths)})
save_file(out, f"{sys.argv[1]}/rank{args.process_index}.safetensors")
'''


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_agree_under_torchrun(tmp_path, tiny_dir):
    """torchrun, 2 gloo ranks on CPU: weights, bank and paths identical on both; their batches differ."""
    import subprocess
    import sys

    from test_train_ddp import ranks_agree

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path), "--output_dir", str(tmp_path / "hf"), "--max_steps", "4", "--per_device_train_batch_size",
           "4", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
           "--max_grad_norm", "0.5", "--trelm_overrides", *TINY, *SHARED, f"data.dir={tiny_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks_agree(tmp_path)


@pytest.mark.slow
def test_example_script(tmp_path, tiny_dir, capsys):
    """examples/run_trelm_mlm.py: trains, writes a from_pretrained-loadable model; bad settings exit 2."""
    import runpy
    import sys

    from transformers import AutoModelForMaskedLM

    main = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "run_trelm_mlm.py"))["main"]
    common = ["--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none",
              "--disable_tqdm", "true", "--save_strategy", "no"]
    out = tmp_path / "hf"
    assert main(["--output_dir", str(out), "--max_steps", "2", *common, "--trelm_overrides", *TINY,
                 f"data.dir={tiny_dir}"]) == 0
    AutoModelForMaskedLM.from_pretrained(out / "model")
    assert (out / "train_results.json").is_file() and (out / "trelm_model.safetensors").is_file()
    assert main(["--output_dir", str(out), *common, "--trelm_overrides", "routing.refresh=0",
                 f"data.dir={tiny_dir}"]) == 2
    assert "routing.refresh must be > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_snippet_runs(tmp_path, tiny_dir, monkeypatch):
    """The README's "Use with Hugging Face Trainer" snippet as written, with 2 steps of 4 sequences
    instead of 300 of 16, in a directory whose data_cache/synthetic is the tiny dataset."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Use with Hugging Face Trainer", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shrunk = code.replace("max_steps=300", "max_steps=2").replace("per_device_train_batch_size=16",
                                                                  "per_device_train_batch_size=4")
    assert shrunk.count("max_steps=2,") == 1 and "per_device_train_batch_size=4," in shrunk
    (tmp_path / "data_cache").mkdir()
    (tmp_path / "data_cache" / "synthetic").symlink_to(tiny_dir)
    monkeypatch.chdir(tmp_path)
    exec(compile(shrunk, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "hf" / "model" / "config.json").is_file()


def test_bf16_trains(tmp_path, tiny_dir):
    """bf16=True: the forward runs under bf16 autocast (the step's precision), the update is finite."""
    trainer = TrelmTrainer(args=trainer_args(tmp_path, tiny_dir, max_steps=3, bf16=True))
    assert trainer.trelm_step.precision.name == "bf16"
    losses = recorded(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    assert trainer.trelm_step.nonfinite_total == 0
