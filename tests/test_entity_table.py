"""The compiled C++ entity table (trelm_fast._C) against a Python dict."""
import numpy as np
import pytest
import torch

from trelm_fast import EntityTable


def test_insert_and_lookup_match_a_dict_and_grow():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**62, size=5000, dtype=np.int64)
    ids = np.concatenate([ids, ids[:1000]])  # repeats get their first slot
    table = EntityTable(capacity=4)
    buckets_before = table._table.num_buckets
    slots = table.insert(ids)
    reference: dict[int, int] = {}
    expected = np.array([reference.setdefault(int(i), len(reference)) for i in ids], dtype=np.int32)
    np.testing.assert_array_equal(slots, expected)
    assert len(table) == len(reference)
    assert table._table.num_buckets > buckets_before
    absent = np.array([2**62 + 1, 3], dtype=np.int64)
    probe = np.concatenate([ids[::7], absent])
    np.testing.assert_array_equal(table.lookup(probe), [reference.get(int(i), -1) for i in probe])


def test_count_and_state_roundtrip():
    table = EntityTable()
    table.count(torch.tensor([3, 9, 3, 3, 0], dtype=torch.int64))
    assert dict(zip(table.ids.tolist(), table.counts.tolist())) == {3: 3, 9: 1, 0: 1}
    restored = EntityTable()
    restored.load_state_dict(table.state_dict())
    ids = torch.tensor([0, 9, 3, 42], dtype=torch.int64)
    assert torch.equal(restored.lookup(ids), table.lookup(ids))
    np.testing.assert_array_equal(restored.counts, table.counts)


@pytest.mark.parametrize(
    "ids, error",
    [
        (np.array([1, 2], dtype=np.int32), TypeError),
        (torch.tensor([1.0]), TypeError),
        (np.zeros((2, 2), dtype=np.int64), ValueError),
        (np.array([4, -1], dtype=np.int64), ValueError),
        ([1, 2], TypeError),
    ],
)
def test_bad_ids_are_rejected(ids, error):
    table = EntityTable()
    with pytest.raises(error):
        table.insert(ids)
    assert len(table) == 0


def test_restored_table_keeps_slots_and_continues_after_growth():
    table = EntityTable(capacity=1)
    ids = torch.arange(100, 0, -3, dtype=torch.int64)
    slots = table.insert(ids)
    restored = EntityTable()
    restored.load_state_dict(table.state_dict())
    assert torch.equal(restored.lookup(ids), slots)
    new = torch.tensor([5000, ids[0].item()], dtype=torch.int64)
    assert restored.insert(new).tolist() == [len(ids), 0]  # next free slot; existing id keeps its slot
    assert restored.lookup(torch.zeros(0, dtype=torch.int64)).shape == (0,)


def test_bad_state_is_rejected():
    table = EntityTable()
    with pytest.raises(ValueError, match="duplicate id 4"):
        table.load_state_dict({"ids": torch.tensor([4, 2, 4]), "counts": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="equal length"):
        table.load_state_dict({"ids": torch.tensor([4, 2]), "counts": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"state\['ids'\] must be int64"):
        table.load_state_dict({"ids": torch.tensor([4.0]), "counts": torch.zeros(1, dtype=torch.int64)})
    with pytest.raises(ValueError, match=">= 0"):
        table.count(np.array([1, -2], dtype=np.int64))
