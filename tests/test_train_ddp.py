"""`torchrun --nproc_per_node=2` on CPU (gloo): both ranks end with the same weights, memory bank and
knowledge paths, each having trained on its own share of the data; rank 0 alone writes outputs."""
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY

from trelm_fast.checkpoint import load_checkpoint

# Runs the trainer's main() under torchrun, then dumps what this rank holds.
RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from safetensors.torch import save_file
    from trelm_fast import train

    held, losses = {}, []
    make_step = train.make_step
    def capture(method, model, cfg):
        step = held["step"] = make_step(method, model, cfg)
        inner = step.step
        def step_fn(*args, **kwargs):
            result = inner(*args, **kwargs)
            losses.append(result.loss)
            return result
        step.step = step_fn
        return step
    train.make_step = capture
    assert train.main(sys.argv[2:]) == 0
    step, rank = held["step"], int(os.environ["RANK"])
    out = {"model/" + k: v.detach().clone() for k, v in step.model.state_dict().items()}
    out.update({"bank/" + k: v for k, v in step.model.bank.state_dict().items() if torch.is_tensor(v)})
    out.update({f"path/{i}": p.clone() for i, p in enumerate(step.paths)})
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    save_file(out, os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
""")


def ranks_agree(directory) -> dict:
    """Assert that rank{0,1}.safetensors in ``directory`` (what each rank dumped: tensors, ``path/*``,
    ``losses``) are equal except the losses, which differ (each rank had its own sequences); rank 0's."""
    r0, r1 = (load_file(directory / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and any(k.startswith("path/") for k in r0)
    for key in r0:
        if key != "losses":
            assert torch.equal(r0[key], r1[key]), key
    assert not torch.equal(r0["losses"], r1["losses"])
    return r0


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_agree(tmp_path, tiny_dir):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path), *TINY, f"data.dir={tiny_dir}", f"out_dir={out}", "train.steps=4",
           "train.checkpoint_every=2", "device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0 = ranks_agree(tmp_path)
    assert r0["bank/counts"].sum() > 0  # the bank was updated (with both ranks' mentions)

    ck = load_checkpoint(out / "checkpoints")  # written by rank 0, same state
    assert ck.step == 4 and len(ck.state["rng"]) == 2 and ck.state["run"]["world_size"] == 2
    weights = load_file(ck.path / "model.safetensors")
    assert all(torch.equal(weights[k], r0["model/" + k]) for k in weights)
    assert torch.equal(ck.state["bank"]["local"], r0["bank/local"])
    assert (out / "model" / "config.json").is_file() and (out / "metrics.jsonl").is_file()
