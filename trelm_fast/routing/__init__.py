"""Dynamic knowledge routing (paper section 3.3, eqs. 9-12); docs/routing.md has the design.

One concept per module:

- `quadrature`: the IG quadrature rules (`quadrature`, `QUADRATURES`).
- `attribution`: what both attribution engines share: target positions, the `Attribution` result,
  the shared prefix pass and the frozen/eval context.
- `fused`: `attribute`, the fused batched attribution the trainer uses.
- `reference`: `attribute_reference`, the Knowledge Neurons style loop (test oracle, `trelm_naive`).
- `selection`: `select_paths` (eq. 12, `RULES`) and `reduce_scores` (sum over DDP ranks).
- `history`: `path_jaccard`, `path_stats` and `PathHistory` (record and heatmap).
- `router`: `KnowledgeRouter`, refresh every R steps for the trainer.
"""
from trelm_fast.routing.attribution import Attribution
from trelm_fast.routing.fused import attribute
from trelm_fast.routing.history import PathHistory, path_jaccard, path_stats
from trelm_fast.routing.quadrature import QUADRATURES, quadrature
from trelm_fast.routing.reference import attribute_reference
from trelm_fast.routing.router import KnowledgeRouter
from trelm_fast.routing.selection import RULES, reduce_scores, select_paths

__all__ = [
    "Attribution", "KnowledgeRouter", "PathHistory", "QUADRATURES", "RULES", "attribute",
    "attribute_reference", "path_jaccard", "path_stats", "quadrature", "reduce_scores", "select_paths",
]
