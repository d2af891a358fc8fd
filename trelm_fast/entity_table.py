"""`EntityTable`: int64 entity id -> int32 slot, backed by the C++ table in csrc/entity_table.cpp.

Entity ids are non-negative int64. String ids (for example Wikidata "Q42") are mapped to int64
once, in the data pipeline: the id of an entity is its row in the dataset's `entities.txt`
(see `trelm_fast.data.formats`). Slots are dense and assigned in insertion order, so slot i is
row i of the memory bank's tensors.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    from trelm_fast import _C
except ImportError as err:  # no silent fallback: the table exists only in C++
    raise ImportError(
        "trelm_fast._C (the compiled C++ extension) is missing. Build it with "
        "`pip install -e .` (or `make setup`) from the repository root; it needs a C++17 "
        "compiler and pybind11."
    ) from err

IdsLike = np.ndarray | torch.Tensor


def _as_int64_array(ids: IdsLike, name: str = "ids") -> np.ndarray:
    """A contiguous 1-D int64 numpy view of `ids` (numpy array or CPU/GPU torch tensor)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype != torch.int64:
            raise TypeError(f"EntityTable: {name} must be int64, got torch tensor of dtype {ids.dtype}")
        ids = ids.detach().cpu().numpy()
    elif isinstance(ids, np.ndarray):
        if ids.dtype != np.int64:
            raise TypeError(f"EntityTable: {name} must be int64, got numpy array of dtype {ids.dtype}")
    else:
        raise TypeError(f"EntityTable: {name} must be a numpy array or torch tensor, got {type(ids).__name__}")
    if ids.ndim != 1:
        raise ValueError(f"EntityTable: {name} must be 1-D, got shape {tuple(ids.shape)}")
    return np.ascontiguousarray(ids)


def _like(slots: np.ndarray, ids: IdsLike) -> IdsLike:
    """Return `slots` as the same kind of container as `ids` (torch tensors keep their device)."""
    if isinstance(ids, torch.Tensor):
        return torch.from_numpy(slots).to(ids.device)
    return slots


class EntityTable:
    """Open-addressing hash table from int64 entity ids (>= 0) to int32 slots.

    All operations are batched over 1-D int64 numpy arrays or torch tensors and run in C++
    with the GIL released. The table grows when its load factor would exceed 1/2; an existing
    entry is never overwritten.
    """

    def __init__(self, capacity: int = 0):
        self._table = _C.EntityTable(int(capacity))

    def insert(self, ids: IdsLike) -> IdsLike:
        """Insert absent ids; returns the slot of every id, int32, shape [n]."""
        return _like(self._table.insert(_as_int64_array(ids)), ids)

    def lookup(self, ids: IdsLike) -> IdsLike:
        """Slots of `ids`, int32, shape [n]; -1 where an id is absent."""
        return _like(self._table.lookup(_as_int64_array(ids)), ids)

    def count(self, ids: IdsLike) -> None:
        """Frequency counting: inserts absent ids and adds 1 per occurrence."""
        self._table.count(_as_int64_array(ids))

    def __len__(self) -> int:
        return len(self._table)

    @property
    def ids(self) -> np.ndarray:
        """Stored ids in slot order, int64 [len]."""
        return self._table.to_arrays()[0]

    @property
    def counts(self) -> np.ndarray:
        """Occurrence counts in slot order, int64 [len]."""
        return self._table.to_arrays()[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        ids, counts = self._table.to_arrays()
        return {"ids": torch.from_numpy(ids), "counts": torch.from_numpy(counts)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the contents with a `state_dict()`; slots are restored exactly."""
        ids = _as_int64_array(state["ids"], "state['ids']")
        counts = _as_int64_array(state["counts"], "state['counts']")
        self._table = _C.EntityTable.from_arrays(ids, counts)
