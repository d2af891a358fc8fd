"""Path selection (eq. 12): scores [layers, I] -> one sorted neuron index tensor per layer, and the
DDP reduction of the scores that makes every rank select the same paths."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from trelm_fast.distributed import is_distributed
from trelm_fast.routing.attribution import true_indices

RULES = ("top_fraction", "threshold", "global_budget", "random")


def reduce_scores(scores: Tensor) -> Tensor:
    """Sum of the scores over DDP ranks (a copy), so every rank selects the same paths."""
    scores = scores.clone()
    if is_distributed():
        dist.all_reduce(scores, op=dist.ReduceOp.SUM)
    return scores


def _path_size(fraction: float, width: int) -> int:
    """max(1, round(fraction * width)), with fraction checked."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"routing.fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * width))


def select_paths(
    scores: Tensor, rule: str = "top_fraction", fraction: float = 0.1, threshold: float = 0.2, step: int = 0
) -> list[Tensor]:
    """Knowledge paths (eq. 12) from scores [L_attr, I]: one sorted int64 index tensor per row.

    top_fraction: the max(1, round(fraction * I)) highest scores of each layer.
    threshold: neurons with score > 0 and score >= threshold * (layer max); empty if the max <= 0.
    global_budget: the max(1, round(fraction * I * L_attr)) highest scores over all layers pooled.
    random: a control outside the paper: max(1, round(fraction * I)) neurons of each layer drawn
    uniformly, seeded by `step` (so every rank, and a resumed run, draws the same); the scores give
    only the shape and device (`KnowledgeRouter` attributes nothing for it).
    The paths stay on the scores' device; top_fraction reads nothing on the host, the other rules
    read the path sizes once.
    """
    if scores.dim() != 2:
        raise ValueError(f"select_paths: scores must be [layers, I], got {tuple(scores.shape)}")
    n_layers, width = scores.shape
    if rule == "top_fraction":
        k = _path_size(fraction, width)
        return list(scores.topk(k, dim=1).indices.sort(dim=1).values.unbind(0))
    if rule == "threshold":
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"routing.threshold must be in (0, 1], got {threshold}")
        top = scores.max(dim=1, keepdim=True).values
        keep = (scores > 0) & (scores >= threshold * top)
        sizes = keep.sum(1).tolist()  # the one host read: path sizes depend on the scores
        flat = true_indices(keep.flatten(), sum(sizes))
        return list((flat % width).split(sizes))
    if rule == "global_budget":
        k = _path_size(fraction, width * n_layers)
        flat = scores.reshape(-1).topk(k).indices.sort().values  # layer-major
        bounds = torch.arange(n_layers + 1, device=flat.device) * width
        sizes = torch.searchsorted(flat, bounds).diff().tolist()  # the one host read: sizes depend on the scores
        return list((flat % width).split(sizes))
    if rule == "random":
        k = _path_size(fraction, width)
        gen = torch.Generator().manual_seed(step)
        return [torch.randperm(width, generator=gen)[:k].sort().values.to(scores.device) for _ in range(n_layers)]
    raise ValueError(f"routing.rule must be one of {RULES}, got {rule!r}")
