"""Under DDP every rank must select the same knowledge paths: scores are summed over ranks first."""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import transformers

from ranks import spawn_ranks
from trelm_fast.losses import sample_negatives
from trelm_fast.routing import KnowledgeRouter, attribute, select_paths

pytestmark = pytest.mark.distributed
V, D = 31, 16


def _model():
    torch.manual_seed(0)  # same weights on every rank, as DDP guarantees
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=29)
    return transformers.BertForMaskedLM(cfg)


def _rank_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    hidden = torch.randn(3, 7, D, generator=g)
    labels = torch.full((3, 7), -100)
    labels[0, 1 + rank] = 4 + rank
    labels[2, 3] = 9
    neg = sample_negatives(labels[labels != -100], torch.ones(V) / V, 5, g)
    return hidden, torch.ones(3, 7, dtype=torch.long), labels, neg


def _worker(rank, world, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        router = KnowledgeRouter(_model(), m=4, fraction=0.2)
        paths = router.refresh(0, *_rank_batch(rank))
        torch.save([p.clone() for p in paths], os.path.join(out_dir, f"paths{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_select_identical_paths_from_summed_scores(tmp_path):
    world = 2
    spawn_ranks(_worker, (world, str(tmp_path / "store"), str(tmp_path)), world)
    got = [torch.load(tmp_path / f"paths{r}.pt") for r in range(world)]
    assert all(torch.equal(a, b) for a, b in zip(got[0], got[1]))
    model = _model()
    summed = sum(attribute(model, *_rank_batch(r), m=4).scores for r in range(world))
    expected = select_paths(summed, fraction=0.2)
    assert all(torch.equal(a, b) for a, b in zip(got[0], expected))
    local = select_paths(attribute(model, *_rank_batch(0), m=4).scores, fraction=0.2)
    assert any(not torch.equal(a, b) for a, b in zip(local, expected))  # the reduction mattered
