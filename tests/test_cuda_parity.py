"""The same `trelm` training steps on CUDA and on CPU end in the same state (run by `make gpu-check`).

`train_state(device, data_dir)`: STEPS steps of `trelm` (the Triton kernels on CUDA, their PyTorch
references on CPU) on a random-init tiny model built from the same seed, over the generated dataset
(no wheel, no weights) with the trainer's own batches, fp32 with TF32 off and dropout 0, paths
refreshed every 2 steps. `differences(a, b)`: the largest parameter and bank differences and the
smallest per-layer Jaccard overlap of the final knowledge paths. Tolerances: parameters and bank
PARAM_ATOL (absolute; each Adam step moves a weight by up to lr = 1e-3), bank counts exact, paths
Jaccard >= PATH_JACCARD (neurons with nearly equal attribution scores may swap at the cut). The CPU
test runs the same helpers CPU against CPU, so their code is known to work where no GPU is.
"""
import pytest
import torch

from test_model import tiny_config
from trelm_fast.data.generated import BASE_MODEL, GeneratedConfig, build_generated

STEPS = 5
PARAM_ATOL = 1e-4
PATH_JACCARD = 0.9


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity") / "generated"
    build_generated(d, GeneratedConfig(entities=64, relations=4, triples=256, seq_len=32, train_sequences=16,
                                       valid_sequences=2, transe_dim=8))
    return d


def train_state(device: str, data_dir) -> dict:
    """Parameters, bank and paths (on CPU) after STEPS steps of `trelm` on `device`."""
    from trelm_fast.step import build_step_model, make_step
    from trelm_fast.train import Dist, batches

    cfg = tiny_config(f"model.path={data_dir / BASE_MODEL}", f"data.dir={data_dir}", "train.precision=fp32",
                      "train.tf32=false", "train.batch_size=4", "model.dropout=0.0")
    torch.manual_seed(0)
    model = build_step_model("trelm", cfg, data_dir, device=device)
    step = make_step("trelm", model, cfg)
    initial = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    data = batches(cfg, data_dir, Dist(0, 1, torch.device("cpu")), 0, 0)
    for i in range(STEPS):
        _, _, batch = next(data)
        result = step(batch, i)
        assert not result.skipped_nonfinite, f"step {i} on {device}: non-finite loss {float(result.loss)}"
    bank = model.bank
    return {"initial": initial,
            "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters()},
            "bank": {"local": bank.local.cpu().float(), "global_mean": bank.global_mean.cpu().float(),
                     "counts": bank.counts.cpu()},
            "paths": [p.cpu() for p in step.paths]}


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def differences(a: dict, b: dict) -> dict:
    """max |param difference|, max |bank difference|, whether the counts agree, min path Jaccard."""
    assert a["params"].keys() == b["params"].keys() and len(a["paths"]) == len(b["paths"])
    return {
        "param": max((a["params"][n] - b["params"][n]).abs().max().item() for n in a["params"]),
        "bank": max((a["bank"][k] - b["bank"][k]).abs().max().item() for k in ("local", "global_mean")),
        "counts_equal": torch.equal(a["bank"]["counts"], b["bank"]["counts"]),
        "path_jaccard": min(_jaccard(p, q) for p, q in zip(a["paths"], b["paths"])),
    }


def check_parity(a: dict, b: dict) -> None:
    moved = max((a["params"][n] - a["initial"][n]).abs().max().item() for n in a["params"])
    assert moved > 10 * PARAM_ATOL, f"the steps barely moved the weights ({moved:.2e}): the comparison says nothing"
    d = differences(a, b)
    assert d["param"] <= PARAM_ATOL and d["bank"] <= PARAM_ATOL, d
    assert d["counts_equal"] and d["path_jaccard"] >= PATH_JACCARD, d


def test_parity_helpers_cpu_against_cpu(data_dir):
    a, b = train_state("cpu", data_dir), train_state("cpu", data_dir)
    check_parity(a, b)
    d = differences(a, b)
    assert d["param"] == 0.0 and d["bank"] == 0.0 and d["path_jaccard"] == 1.0  # deterministic on one device


@pytest.mark.cuda
def test_cuda_steps_match_cpu(data_dir):
    check_parity(train_state("cuda", data_dir), train_state("cpu", data_dir))
