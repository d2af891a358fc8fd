"""`KnowledgeRouter`: the trainer's entry point to routing (attribute, reduce over ranks, select)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from trelm_fast.routing.attribution import ffn_width, model_layers, resolve_layers
from trelm_fast.routing.fused import attribute
from trelm_fast.routing.history import PathHistory, path_stats
from trelm_fast.routing.quadrature import QUADRATURES
from trelm_fast.routing.selection import RULES, reduce_scores, select_paths


class KnowledgeRouter:
    """Refreshes knowledge paths every `refresh` (R) steps: attribute, reduce over ranks, select.

    Arguments mirror `trelm_fast.config.RoutingConfig`; `from_config` reads one. The defaults
    (3-point Gauss-Legendre, all sequences, R = 50, top 10% per layer) are the measured choice in
    docs/routing.md (path agreement with exact m = 20 Riemann paths against cost).
    """

    def __init__(
        self,
        model: nn.Module,
        m: int = 3,
        quadrature: str = "gauss_legendre",
        layers=None,
        refresh: int = 50,
        fraction: float = 0.1,
        rule: str = "top_fraction",
        threshold: float = 0.2,
        sequences: int = 0,
        max_copies: int = 0,
        autocast: torch.dtype | None = None,
    ):
        if refresh < 1:
            raise ValueError(f"routing.refresh must be >= 1, got {refresh}")
        if quadrature not in QUADRATURES:
            raise ValueError(f"routing.quadrature must be one of {QUADRATURES}, got {quadrature!r}")
        if rule not in RULES:
            raise ValueError(f"routing.rule must be one of {RULES}, got {rule!r}")
        adapter, enc = model_layers(model)
        self.model = model
        self.layers = resolve_layers(layers, len(enc))
        self.intermediate_size = ffn_width(adapter, enc)
        self.m, self.quadrature, self.refresh_every = m, quadrature, refresh
        self.rule, self.fraction, self.threshold = rule, fraction, threshold
        self.sequences, self.max_copies, self.autocast = sequences, max_copies, autocast
        self.paths: list[Tensor] | None = None
        self.stats: dict[str, float] = {}
        self.history = PathHistory(self.layers, self.intermediate_size)

    @classmethod
    def from_config(cls, model: nn.Module, cfg, autocast: torch.dtype | None = None) -> "KnowledgeRouter":
        """A router with the settings of ``cfg`` (a RoutingConfig); ``autocast`` as in `attribute`."""
        return cls(
            model, m=cfg.m, quadrature=cfg.quadrature, layers=cfg.layers, refresh=cfg.refresh,
            fraction=cfg.fraction, rule=cfg.rule, threshold=cfg.threshold, sequences=cfg.sequences,
            max_copies=cfg.max_copies, autocast=autocast,
        )

    def due(self, step: int) -> bool:
        """True on the steps that refresh the paths: the first call and every R steps after step 0."""
        return self.paths is None or step % self.refresh_every == 0

    def refresh(self, step: int, hidden: Tensor, attention_mask: Tensor, cka_labels: Tensor, negatives: Tensor) -> list[Tensor]:
        """Attribute this batch, sum scores over ranks, select; updates `paths`, `stats`, `history`.
        The `random` rule (a control) attributes nothing."""
        attr = None
        if self.rule == "random":  # the control draws its paths without scores
            scores = torch.zeros(len(self.layers), self.intermediate_size, device=hidden.device)
        else:
            attr = attribute(
                self.model, hidden, attention_mask, cka_labels, negatives, m=self.m, quadrature_rule=self.quadrature,
                layers=self.layers, sequences=self.sequences, max_copies=self.max_copies, autocast=self.autocast,
            )
            scores = reduce_scores(attr.scores)
        paths = select_paths(scores, self.rule, self.fraction, self.threshold, step)
        # the refresh's device->host copies: all paths at once, then P (the device is idle by then)
        host = list(torch.cat(paths).cpu().split([len(p) for p in paths]))
        self.stats = path_stats(self.layers, host, self.paths)
        if attr is not None:
            self.stats["routing/prob"] = attr.prob
            self.stats["routing/targets"] = float(attr.num_targets)
        self.paths = host
        self.history.record(step, self.paths)
        return self.paths
