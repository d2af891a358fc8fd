"""KnowledgeMemoryBank: eqs. 4-8 against a direct per-span computation, growth, persistence, bad input."""
import io

import pytest
import torch

from trelm_fast import KnowledgeMemoryBank

D = 24


def _bank(n_entities=6, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    bank = KnowledgeMemoryBank(D, **{"window": 3, "gamma": 0.3, "capacity": 2, **kwargs})
    ids = torch.arange(n_entities, dtype=torch.int64) * 1000 + 7  # sparse ids
    bank.add_entities(ids, torch.randn(n_entities, D, generator=g))
    return bank, ids


def _batch(ids, seed, b=3, n=29, spans=11):
    """Random final states, right-padded mask and spans that repeat entities within and across rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, n, D, generator=g)
    lengths = torch.randint(n // 2, n + 1, (b,), generator=g)
    lengths[0] = n
    rows, out = torch.randint(0, b, (spans,), generator=g), []
    for row in rows.tolist():
        start = int(torch.randint(1, int(lengths[row]) - 1, (1,), generator=g))
        end = min(start + int(torch.randint(1, 5, (1,), generator=g)), int(lengths[row]))
        out.append([row, start, end, int(ids[torch.randint(0, 3, (1,), generator=g)])])  # 3 of the entities
    mask = (torch.arange(n) < lengths[:, None]).long()
    return hidden, torch.tensor(out, dtype=torch.int64), mask


def _direct(bank, batches):
    """Eqs. 4-6 written out span by span (dicts keyed by entity id)."""
    local = {int(e): bank.local[i].clone() for i, e in enumerate(bank.table.ids)}
    sums = {e: torch.zeros(D) for e in local}
    contexts = {e: 0 for e in local}
    k, gamma = bank.window, bank.gamma
    for hidden, spans, mask in batches:
        seen = set()
        for row, start, end, ent in spans.tolist():
            length = int(mask[row].sum())
            window = hidden[row, max(start - k, 0) : min(end + k, length)]
            local[ent] = (1 - gamma) * local[ent] + gamma * window.mean(0)
            if (row, ent) not in seen:  # a context counts once per entity
                seen.add((row, ent))
                sums[ent] += hidden[row, 0]
                contexts[ent] += 1
    return local, sums, contexts


def test_update_follows_eqs_4_to_6_over_two_batches():
    bank, ids = _bank()
    batches = [_batch(ids, seed) for seed in (1, 2)]
    local, sums, contexts = _direct(bank, batches)
    for hidden, spans, mask in batches:
        bank.update(hidden, spans, attention_mask=mask)
    for i, e in enumerate(bank.table.ids.tolist()):
        torch.testing.assert_close(bank.local[i], local[e])
        assert int(bank.counts[i]) == contexts[e]
        expected = sums[e] / contexts[e] if contexts[e] else torch.zeros(D)
        torch.testing.assert_close(bank.global_mean[i], expected)
    assert int(bank.counts.sum()) > 0 and (bank.counts == 0).any()  # some entities never seen


def test_lengths_and_mask_agree_and_default_is_full_length():
    bank_a, ids = _bank()
    bank_b, _ = _bank()
    hidden, spans, mask = _batch(ids, 3)
    bank_a.update(hidden, spans, attention_mask=mask)
    bank_b.update(hidden, spans, lengths=mask.sum(1))
    assert torch.equal(bank_a.local, bank_b.local)
    full, _ = _bank()
    expected = _direct(full, [(hidden, spans, torch.ones_like(mask))])[0]
    full.update(hidden, spans)
    for i, e in enumerate(full.table.ids.tolist()):
        torch.testing.assert_close(full.local[i], expected[e])


def test_update_without_spans_changes_nothing():
    bank, _ = _bank()
    before = bank.state_dict()
    bank.update(torch.randn(2, 9, D), torch.zeros(0, 4, dtype=torch.int64))
    after = bank.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("local", "global_mean", "counts"))


def test_read_is_eq_7_with_lambda_of_eq_8_and_grad_only_to_h_e():
    bank, ids = _bank(lambda0=0.5, beta=2.0)
    hidden, spans, mask = _batch(ids, 4)
    bank.update(hidden, spans, attention_mask=mask)
    assert bank.lam(0) == 0.5 and bank.lam(2) == 0.125 and bank.lam(1.5) == pytest.approx(0.5 / 2**1.5)
    query = torch.tensor([ids[0], ids[5], ids[0]])  # ids[5] never updated: count 0
    h_e = torch.randn(3, D, requires_grad=True)
    out = bank.read(query, h_e, epoch=1)
    lam = 0.25
    slots = bank.slots(query)
    assert int(bank.counts[slots[1]]) == 0 and int(bank.counts[slots[0]]) > 0
    glob = torch.stack([bank.global_mean[slots[0]], bank.local[slots[1]], bank.global_mean[slots[0]]])
    expected = (1 - lam) * h_e + lam / 2 * (bank.local[slots] + glob)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    torch.testing.assert_close(h_e.grad, torch.full_like(h_e, 1 - lam))
    assert not bank.local.requires_grad and not bank.global_mean.requires_grad


def test_bank_grows_and_keeps_rows():
    bank, ids = _bank(n_entities=3)
    before = bank.local.clone()
    more = torch.arange(50, 60, dtype=torch.int64)
    rows = bank.add_entities(more, torch.ones(10, D))
    assert rows.tolist() == list(range(3, 13)) and len(bank) == 13
    assert torch.equal(bank.local[:3], before)
    assert torch.equal(bank.local[3:], torch.ones(10, D))
    assert bank.contains(torch.tensor([50, 7, 8])).tolist() == [True, True, False]


def test_name_embeddings_are_mean_token_embeddings():
    emb = torch.randn(30, D)
    tokens = torch.tensor([3, 4, 5, 9, 1, 1, 2])
    offsets = torch.tensor([0, 3, 4, 7])
    expected = torch.stack([emb[[3, 4, 5]].mean(0), emb[9], emb[[1, 1, 2]].mean(0)])
    torch.testing.assert_close(KnowledgeMemoryBank.name_embeddings(emb, tokens, offsets), expected)
    with pytest.raises(ValueError, match="entity 1 has no tokens"):
        KnowledgeMemoryBank.name_embeddings(emb, tokens, torch.tensor([0, 3, 3, 7]))
    with pytest.raises(ValueError, match="offsets must start at 0"):
        KnowledgeMemoryBank.name_embeddings(emb, tokens, torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 30\)"):
        KnowledgeMemoryBank.name_embeddings(emb, torch.tensor([30]), torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_exact(dtype):
    bank, ids = _bank(dtype=dtype)
    hidden, spans, mask = _batch(ids, 5)
    bank.update(hidden, spans, attention_mask=mask)
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    restored = KnowledgeMemoryBank(D, window=3, gamma=0.3, dtype=dtype)
    restored.load_state_dict(torch.load(buf))
    for name in ("local", "global_mean", "counts"):
        assert torch.equal(getattr(restored, name), getattr(bank, name)), name
    assert torch.equal(restored.slots(ids), bank.slots(ids))
    hidden, spans, mask = _batch(ids, 6)  # both go on identically
    bank.update(hidden, spans, attention_mask=mask)
    restored.update(hidden, spans, attention_mask=mask)
    assert torch.equal(restored.local, bank.local) and torch.equal(restored.global_mean, bank.global_mean)


def test_low_precision_storage_tracks_fp32():
    exact, ids = _bank()
    half, _ = _bank(dtype="bfloat16")
    for seed in range(3):
        batch = _batch(ids, seed)
        exact.update(*batch[:2], attention_mask=batch[2])
        half.update(*batch[:2], attention_mask=batch[2])
    assert half.local.dtype == torch.bfloat16
    torch.testing.assert_close(half.local.float(), exact.local, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(half.global_mean.float(), exact.global_mean, atol=3e-2, rtol=3e-2)


def test_loading_another_hidden_size_is_an_error():
    bank, _ = _bank()
    with pytest.raises(ValueError, match="hidden size 24, this bank 32"):
        KnowledgeMemoryBank(32).load_state_dict(bank.state_dict())


def _bad_ids():
    return [
        (torch.tensor([7], dtype=torch.int32), TypeError, "int64"),
        (torch.tensor([[7]]), TypeError, "1-D int64"),
        ([7], TypeError, "torch tensor"),
        (torch.tensor([7, -3]), ValueError, ">= 0"),
        (torch.tensor([7, 8, 9]), ValueError, "2 of 3 entity ids are not in the bank"),
    ]


@pytest.mark.parametrize("ids, error, match", _bad_ids())
def test_bad_ids_in_read(ids, error, match):
    bank, _ = _bank()
    with pytest.raises(error, match=match):
        bank.read(ids, torch.zeros(len(ids), D), epoch=0)


def test_a_bank_whose_ids_are_its_rows_checks_them_on_the_device():
    """Ids 0..N-1 added in order are the rows: no table lookup, an id outside [0, N) fails the
    device-side assertion (synchronous on the CPU), an id of an empty bank a ValueError."""
    bank = KnowledgeMemoryBank(D)
    with pytest.raises(ValueError, match="the bank is empty"):
        bank.slots(torch.tensor([0]))
    assert bank.slots(torch.tensor([], dtype=torch.int64)).numel() == 0
    bank.add_entities(torch.arange(5), torch.randn(5, D))
    assert torch.equal(bank.slots(torch.tensor([4, 0, 2])), torch.tensor([4, 0, 2]))
    for bad in ([5], [-1], [0, 7]):
        with pytest.raises(RuntimeError, match="not in the bank"):
            bank.slots(torch.tensor(bad))


@pytest.mark.parametrize(
    "span, match",
    [
        ([0, 5, 5, 7], "span outside the sequence"),  # empty span
        ([1, 20, 30, 7], "span outside the sequence"),  # past the padded length of row 1
        ([0, -1, 2, 7], "span outside the sequence"),
        ([3, 1, 2, 7], "row out of range"),
        ([0, 1, 2, -7], "negative entity id"),
        ([0, 1, 2, 8], "not in the bank"),
    ],
)
def test_bad_spans_in_update(span, match):
    bank, _ = _bank()
    hidden = torch.randn(3, 29, D)
    mask = torch.ones(3, 29, dtype=torch.long)
    mask[1, 25:] = 0
    spans = torch.tensor([[0, 1, 3, 7], span], dtype=torch.int64)
    before = bank.local.clone()
    with pytest.raises(ValueError, match=match):
        bank.update(hidden, spans, attention_mask=mask)
    assert torch.equal(bank.local, before)


def test_bad_update_arguments():
    bank, _ = _bank()
    hidden = torch.randn(2, 9, D)
    spans = torch.tensor([[0, 1, 2, 7]])
    with pytest.raises(TypeError, match=r"int64 tensor \[E, 4\]"):
        bank.update(hidden, spans.int())
    with pytest.raises(TypeError, match=r"int64 tensor \[E, 4\]"):
        bank.update(hidden, spans[:, :3])
    with pytest.raises(ValueError, match="final_hidden must be a float"):
        bank.update(torch.randn(2, 9, D + 1), spans)
    left_padded = torch.ones(2, 9, dtype=torch.long)
    left_padded[1, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        bank.update(hidden, spans, attention_mask=left_padded)
    with pytest.raises(ValueError, match="not both"):
        bank.update(hidden, spans, attention_mask=left_padded, lengths=torch.tensor([9, 9]))


def test_bad_add_entities():
    bank, ids = _bank()
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add_entities(ids[:2], torch.zeros(2, D))
    with pytest.raises(ValueError, match="duplicate entity id 5"):
        bank.add_entities(torch.tensor([5, 5]), torch.zeros(2, D))
    with pytest.raises(ValueError, match=r"shape \(2, 24\)"):
        bank.add_entities(torch.tensor([5, 6]), torch.zeros(2, D + 1))
    with pytest.raises(ValueError, match="dtype must be one of"):
        KnowledgeMemoryBank(D, dtype=torch.float64)


@pytest.mark.cuda
def test_cuda_bank_uses_the_kernel_and_matches_cpu():
    cpu, ids = _bank()
    gpu, _ = _bank(device="cuda")
    for seed in range(2):
        hidden, spans, mask = _batch(ids, seed)
        cpu.update(hidden, spans, attention_mask=mask)
        gpu.update(hidden.cuda(), spans.cuda(), attention_mask=mask.cuda())
    torch.testing.assert_close(gpu.local.cpu(), cpu.local)
    torch.testing.assert_close(gpu.global_mean.cpu(), cpu.global_mean)
    assert torch.equal(gpu.counts.cpu(), cpu.counts)
