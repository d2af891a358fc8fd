"""Paths over training: overlap statistics for logging and the membership record with its heatmap."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def path_jaccard(a: Tensor, b: Tensor) -> float:
    """|a & b| / |a | b| of two host index sets (1.0 when both are empty)."""
    a_set, b_set = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    union = len(a_set | b_set)
    return 1.0 if union == 0 else len(a_set & b_set) / union


def path_stats(layers, paths: list[Tensor], previous: list[Tensor] | None = None) -> dict[str, float]:
    """Logging scalars: neurons per layer, and Jaccard overlap with the previous paths when given
    (paths on the host)."""
    stats = {f"routing/neurons/layer{l}": float(p.numel()) for l, p in zip(layers, paths)}
    stats["routing/neurons_mean"] = sum(p.numel() for p in paths) / max(1, len(paths))
    if previous is not None:
        jac = [path_jaccard(p, q) for p, q in zip(paths, previous)]
        stats.update({f"routing/jaccard/layer{l}": j for l, j in zip(layers, jac)})
        stats["routing/jaccard_mean"] = sum(jac) / max(1, len(jac))
    return stats


class PathHistory:
    """Selected paths over training, as a [refreshes, layers, I] membership record, and its heatmap."""

    def __init__(self, layers, intermediate_size: int):
        self.layers = tuple(layers)
        self.intermediate_size = intermediate_size
        self.steps: list[int] = []
        self.masks: list[np.ndarray] = []

    def record(self, step: int, paths: list[Tensor]) -> None:
        """Add the paths (on the host) selected at `step`."""
        mask = np.zeros((len(self.layers), self.intermediate_size), dtype=bool)
        for i, p in enumerate(paths):
            mask[i, np.asarray(p)] = True
        self.steps.append(int(step))
        self.masks.append(mask)

    def state_dict(self) -> dict:
        """{"steps": int64 [R], "masks": uint8 [R, layers, ceil(I / 8)]}: the record, bit-packed."""
        masks = np.stack(self.masks) if self.masks else np.zeros((0, len(self.layers), self.intermediate_size), bool)
        return {"steps": torch.tensor(self.steps, dtype=torch.int64),
                "masks": torch.from_numpy(np.packbits(masks, axis=-1))}

    def load_state_dict(self, state: dict) -> None:
        """Replace the record with a `state_dict()` of a history over the same layers and I."""
        packed = np.asarray(state["masks"], dtype=np.uint8)
        want = (len(self.layers), (self.intermediate_size + 7) // 8)
        if packed.ndim != 3 or packed.shape[1:] != want or packed.shape[0] != len(state["steps"]):
            raise ValueError(f"PathHistory.load_state_dict: masks {tuple(packed.shape)} do not fit "
                             f"{len(state['steps'])} refreshes x {want[0]} layers x I = {self.intermediate_size}")
        masks = np.unpackbits(packed, axis=-1, count=self.intermediate_size).astype(bool)
        self.steps = [int(t) for t in state["steps"]]
        self.masks = list(masks)

    def plot(self, path) -> None:
        """PNG: one panel per layer, x = neuron, y = training step, dark = on the knowledge path."""
        if not self.masks:
            raise ValueError("PathHistory.plot: nothing recorded yet")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        data = np.stack(self.masks)  # [T, L, I]
        fig, axes = plt.subplots(len(self.layers), 1, figsize=(10, 1.2 + 1.1 * len(self.layers)), sharex=True, squeeze=False)
        # Row k holds the paths from steps[k] until the next refresh; the last row gets the last interval.
        last_interval = self.steps[-1] - self.steps[-2] if len(self.steps) > 1 else 1
        extent = (-0.5, self.intermediate_size - 0.5, self.steps[-1] + max(last_interval, 1), self.steps[0])
        for ax, i in zip(axes[:, 0], range(len(self.layers))):
            ax.imshow(data[:, i, :], aspect="auto", interpolation="nearest", cmap="Greys", extent=extent)
            ax.set_ylabel(f"layer {self.layers[i]}\nstep")
        axes[-1, 0].set_xlabel("FFN neuron")
        fig.suptitle("Knowledge paths over training (dark = selected)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
