"""Loader: the batch contract of docs/architecture.md, MLM masking, determinism, resume, ranks."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from trelm_fast.data.formats import read_kg
from trelm_fast.data.loader import (MLMCollator, ResumableSampler, TrelmDataset, check_tokenizer, load_entities,
                                    load_entity_tokens, load_kg_embeddings, load_probes, load_relations)
from trelm_fast.data.prepare import DERIVED

CONTRACT = {"input_ids": 2, "attention_mask": 2, "mlm_labels": 2, "cka_labels": 2, "entity_spans": 4,
            "target_spans": 4, "target_triples": 2}


def _loader(ds, seed=0, **kw):
    sampler_kw = {k: kw.pop(k) for k in ("start", "epoch", "rank", "world_size") if k in kw}
    return DataLoader(ds, batch_size=kw.pop("batch_size", 8), sampler=ResumableSampler(len(ds), seed=seed, **sampler_kw),
                      collate_fn=MLMCollator(ds.manifest, seed=seed), **kw)


def test_batch_contract(tiny_dir):
    ds = TrelmDataset(tiny_dir)
    t = ds.manifest["tokenizer"]
    ents, rels = load_entities(tiny_dir), load_relations(tiny_dir)
    kg = set(read_kg(tiny_dir / "kg.tsv"))
    n_targets = 0
    for batch in _loader(ds, batch_size=7):
        assert set(batch) == set(CONTRACT) | set(DERIVED)  # the host-side index fields come with the batch
        B, n = batch["input_ids"].shape
        flat = batch["mlm_labels"].reshape(-1)
        assert torch.equal(flat[batch["mlm_positions"]], batch["mlm_targets"])
        assert (batch["mlm_targets"] != -100).all() and (flat != -100).sum() == batch["mlm_targets"].numel()
        assert n == 128
        for k, cols in CONTRACT.items():  # the contract's own fields
            v = batch[k]
            assert v.dtype == torch.int64
            assert v.shape == ((B, n) if cols == 2 and k != "target_triples" else (v.shape[0], cols))
        orig = batch["input_ids"].clone()
        mlm, cka, att = batch["mlm_labels"], batch["cka_labels"], batch["attention_mask"]
        orig[mlm != -100] = mlm[mlm != -100]
        assert ((mlm == -100) | (att == 1)).all() and (mlm[:, 0] == -100).all()
        assert not torch.isin(mlm, torch.tensor([t["cls_id"], t["sep_id"], t["pad_id"]])).any()
        es, ts, tt = batch["entity_spans"], batch["target_spans"], batch["target_triples"]
        assert len(ts) == len(tt) and set(map(tuple, ts.tolist())) <= set(map(tuple, es.tolist()))
        in_target = torch.zeros_like(mlm, dtype=torch.bool)
        for (row, s, e, ent), (h, r) in zip(ts.tolist(), tt.tolist()):
            in_target[row, s:e] = True
            assert (ents[h], rels[r], ents[ent]) in kg
        assert ((cka != -100) == in_target).all()
        assert (cka[in_target] == batch["input_ids"][in_target]).all()  # targets are never MLM-masked
        assert (mlm[in_target] == -100).all()
        assert (es[:, 2] > es[:, 1]).all() and (att[es[:, 0], es[:, 2] - 1] == 1).all()
        n_targets += len(ts)
    assert n_targets == ds.manifest["summary"]["splits"]["train"]["targets"]


def test_masking_rates(tiny_dir):
    ds = TrelmDataset(tiny_dir)
    coll = MLMCollator(ds.manifest, seed=5)
    mask_id = ds.manifest["tokenizer"]["mask_id"]
    chosen = masked = kept = cand = 0
    for epoch in range(3):
        b = coll([ds[(epoch, i)] for i in range(len(ds))])
        sel = b["mlm_labels"] != -100
        chosen += int(sel.sum())
        masked += int((b["input_ids"][sel] == mask_id).sum())
        kept += int((b["input_ids"][sel] == b["mlm_labels"][sel]).sum())
        cand += int((b["attention_mask"].sum() - 2 * len(ds)) - (b["cka_labels"] != -100).sum())
    assert abs(chosen / cand - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.04 and abs(kept / chosen - 0.1) < 0.03


def test_deterministic_per_sample(tiny_dir):
    ds = TrelmDataset(tiny_dir)
    coll = MLMCollator(ds.manifest, seed=1)
    alone = coll([ds[(2, 17)]])
    mixed = coll([ds[(2, 3)], ds[(2, 17)], ds[(0, 17)]])
    assert torch.equal(alone["input_ids"][0], mixed["input_ids"][1])
    assert torch.equal(alone["mlm_labels"][0], mixed["mlm_labels"][1])
    assert not torch.equal(mixed["mlm_labels"][1], mixed["mlm_labels"][2])  # another epoch, another mask
    assert not torch.equal(coll([ds[(2, 17)]])["mlm_labels"], MLMCollator(ds.manifest, seed=2)([ds[(2, 17)]])["mlm_labels"])


def _batches(loader):
    return [b["input_ids"] for b in loader]


def test_resume_and_workers(tiny_dir):
    ds = TrelmDataset(tiny_dir)
    full = _batches(_loader(ds, epoch=1))
    resumed = _batches(_loader(ds, epoch=1, start=3 * 8))
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
    with_workers = _batches(_loader(ds, epoch=1, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(full, with_workers))
    other_epoch = _batches(_loader(ds, epoch=2))
    assert not torch.equal(full[0], other_epoch[0])


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (5, 1), (2, 4)])
def test_sampler_ranks(n, world):
    per_rank = [ResumableSampler(n, seed=4, rank=r, world_size=world, epoch=1) for r in range(world)]
    orders = [[i for _, i in s] for s in per_rank]
    assert len({len(o) for o in orders}) == 1 and len(orders[0]) == -(-n // world)
    assert sorted(set(i for o in orders for i in o)) == list(range(n))
    flat = [i for o in orders for i in o]
    assert len(flat) - len(set(flat)) == world * len(orders[0]) - n  # only the wrap-around padding repeats
    s = per_rank[0]
    s.set_epoch(1, start=1)
    assert [i for _, i in s] == orders[0][1:] and len(s) == len(orders[0]) - 1
    dropped = ResumableSampler(n, shuffle=False, rank=world - 1, world_size=world, drop_last=True)
    assert len(dropped) == n // world
    with pytest.raises(ValueError):
        ResumableSampler(n, rank=world, world_size=world)


def test_accessors_and_checks(tiny_dir):
    ds = TrelmDataset(tiny_dir, split="valid")
    assert 0 < len(ds) < len(TrelmDataset(tiny_dir))
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="no split 'test'"):
        TrelmDataset(tiny_dir, split="test")
    E, R = load_kg_embeddings(tiny_dir)
    ents = load_entities(tiny_dir)
    assert E.shape[0] == len(ents) and R.shape == (len(load_relations(tiny_dir)), E.shape[1])
    toks, off = load_entity_tokens(tiny_dir)
    assert off.shape == (len(ents) + 1,) and off[-1] == len(toks) and (np.diff(off) >= 1).all()
    assert load_probes(tiny_dir) and load_probes(tiny_dir, "heldout")

    class OtherTokenizer:
        def get_vocab(self):
            return {"[PAD]": 0, "a": 1}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1]}

    with pytest.raises(ValueError, match="tokenizer mismatch: dataset built with vocab_size=30522"):
        check_tokenizer(ds.manifest, OtherTokenizer())
