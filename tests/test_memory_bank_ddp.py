"""Under DDP (2 CPU processes, gloo) every rank holds the same bank, equal to applying all batches in rank order."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from ranks import spawn_ranks
from trelm_fast import KnowledgeMemoryBank

D, N_ROWS, SEQ, STEPS = 16, 2, 21, 3
IDS = torch.tensor([11, 22, 33, 44], dtype=torch.int64)


def _new_bank():
    bank = KnowledgeMemoryBank(D, gamma=0.2, window=2)
    bank.add_entities(IDS, torch.randn(len(IDS), D, generator=torch.Generator().manual_seed(0)))
    return bank


def _rank_batch(rank, step):
    """A different batch per rank and step: 3 + 2 * rank spans (none on rank 0 at step 2); entity 33
    twice in row 0 on rank 1."""
    g = torch.Generator().manual_seed(100 * step + rank)
    hidden = torch.randn(N_ROWS, SEQ, D, generator=g)
    lengths = torch.tensor([SEQ, SEQ - 4 - rank])
    spans = [[0, 3, 5, 11], [1, 2, 4, 22]] + [[int(i % N_ROWS), 6, 8 + i % 3, 33] for i in range(1 + 2 * rank)]
    spans = torch.tensor(spans, dtype=torch.int64)
    return hidden, spans[:0] if (rank, step) == (0, 2) else spans, lengths


def _worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    bank = _new_bank()
    for step in range(STEPS):
        hidden, spans, lengths = _rank_batch(rank, step)
        bank.update(hidden, spans, lengths=lengths)
    torch.save(bank.state_dict(), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_hold_the_same_bank_as_one_process_in_rank_order(tmp_path):
    world = 2
    out = tmp_path / "bank"
    spawn_ranks(_worker, (world, str(tmp_path / "store"), str(out)), world)
    states = [torch.load(f"{out}.{r}") for r in range(world)]
    for key in ("local", "global_mean", "counts", "entity_ids"):
        assert torch.equal(states[0][key], states[1][key]), key

    single = _new_bank()  # one process, the ranks' batches stacked in rank order
    for step in range(STEPS):
        parts = [_rank_batch(r, step) for r in range(world)]
        hidden = torch.cat([p[0] for p in parts])
        spans = torch.cat([p[1] + torch.tensor([r * N_ROWS, 0, 0, 0]) for r, p in enumerate(parts)])
        single.update(hidden, spans, lengths=torch.cat([p[2] for p in parts]))
    torch.testing.assert_close(states[0]["local"], single.local)
    torch.testing.assert_close(states[0]["global_mean"], single.global_mean)
    assert torch.equal(states[0]["counts"], single.counts)
    assert single.counts.tolist() == [5, 5, 8, 0]  # 33: 1 + 2 contexts per step; 44 never seen
