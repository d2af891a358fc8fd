"""`kernels` suite: the entity table, the sparse FFN gradient and the fused attribution.

Cases (issue 7's names):
- `entity_table`: `lookups` random present ids in a table of `size` int64 ids; variants
  `entity_table` (the C++ table), `python_dict` (a dict comprehension over `ids.tolist()`, back to
  an int32 array) and `torch_searchsorted` (sorted keys + slot permutation). All three must agree.
- `sparse_ffn-<shape>-p<percent>`: see `sparse_ffn_cases`.
- `attribution-minilm`: see `attribution_cases`.
"""
from __future__ import annotations

import numpy as np
import torch

from harness import Results, Settings, require, time_ms

SUITE = "kernels"


def entity_table_case(settings: Settings, results: Results) -> None:
    """Lookups per second of the three id -> slot maps; the answers are checked to agree."""
    EntityTable = require("trelm_fast.entity_table", "EntityTable")
    size, lookups = (300_000, 100_000) if settings.quick else (3_000_000, 1_000_000)
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 2**62, size=size, dtype=np.int64))
    rng.shuffle(ids)
    queries = ids[rng.integers(0, len(ids), size=lookups)]

    table = EntityTable(capacity=len(ids))
    table.insert(ids)
    as_dict = {int(i): s for s, i in enumerate(ids.tolist())}
    keys_t = torch.from_numpy(ids)
    sorted_keys, order = torch.sort(keys_t)
    order = order.to(torch.int32)
    queries_t = torch.from_numpy(queries)

    def by_table() -> np.ndarray:
        return table.lookup(queries)

    def by_dict() -> np.ndarray:
        return np.fromiter((as_dict.get(i, -1) for i in queries.tolist()), dtype=np.int32, count=len(queries))

    def by_searchsorted() -> torch.Tensor:
        pos = torch.searchsorted(sorted_keys, queries_t).clamp_(max=len(sorted_keys) - 1)
        found = sorted_keys[pos] == queries_t
        return torch.where(found, order[pos], torch.tensor(-1, dtype=torch.int32))

    expected = by_dict()
    if not (np.array_equal(by_table(), expected) and np.array_equal(by_searchsorted().numpy(), expected)):
        raise AssertionError("entity_table: the three lookups disagree")
    for variant, fn in (("entity_table", by_table), ("python_dict", by_dict), ("torch_searchsorted", by_searchsorted)):
        ms = time_ms(fn, settings)
        results.add(SUITE, "entity_table", variant, "wall_ms", ms)
        results.add(SUITE, "entity_table", variant, "lookups_per_s", lookups / (ms / 1e3))
    results.note(SUITE, f"entity_table: {lookups:,} lookups of present ids in a table of {len(ids):,} int64 ids (CPU)")


def run(settings: Settings, results: Results) -> None:
    if settings.wants("entity_table"):
        entity_table_case(settings, results)
