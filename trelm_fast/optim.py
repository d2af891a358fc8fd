"""What trains in TRELM mode, and the optimizer that trains it (paper section 3.3).

Parameter groups (`parameter_group(name)`; each family adapter in `trelm_fast.models` says how its
parameter names map to them):

    embeddings    word/position/type embeddings and their LayerNorm (the tied MLM decoder weight
                  is the word-embedding matrix, so it belongs here)
    attention     self-attention Q/K/V and output projections of every block
    layernorm     the two LayerNorms of every block
    ffn           the full FFN weights W1, b1, W2 (dense training, no path)
    ffn_out_bias  b2, the FFN output bias
    head          the MLM head (transform dense + LayerNorm, decoder bias)
    pooler        the pooler
    other         everything else, e.g. modules the trainer adds (knowledge projection)

`TRELM_TRAINABLE` = {"embeddings", "head", "other"} is the default in TRELM mode: in the Transformer
blocks only the knowledge-path slices of the FFNs learn (the paper's selective update); outside them
the embeddings (with the tied decoder weight, against which every masked token and CKA answer is
scored: a dense [V, d] gradient and Adam update every step), the MLM head and the trainer's own
modules train. Frozen embeddings (`method.trainable=[head,other]`, the default before 2026-11-27)
made a cheaper step but slower learning: docs/results.md, "The embeddings trained beside the
paths". `DENSE_TRAINABLE` is every group.
`configure_trainable` sets requires_grad, so frozen parameters get no gradient and autograd's
backward stops below the lowest layer that has a path or a trainable parameter.

`TrelmOptimizer` drives two updates: torch.optim.AdamW (fused on CPU and CUDA: one multi-tensor
kernel, and it can skip itself on a device-side flag) over the parameters that require grad, with weight decay
on matrices only; and lazy slice AdamW over each TrelmFFN's path: rows S of W1 and b1 and columns S
of W2 with their own Adam moments. A neuron's step counter counts the steps in which it was on the
path; bias correction uses that count, so a neuron's update is exactly AdamW run over the steps in
which it was selected, and unselected neurons see no momentum drift and no weight decay. W1 rows and
W2 columns are decayed, b1 is not. In gated MLPs rows S of the gate (and its bias) are updated like
W1's (and b1's); a fused gate (ModernBERT's [G; W1]) gets rows S and I + S, and weights stored
transposed (GPT-2's Conv1D) are updated through their nn.Linear-layout views. Paths may change
between steps: state is kept for all I neurons.

`slice_lr_scale` (`optim.slice_lr_scale`): the slices learn at `lr` x this, the parameters trained
whole at `lr`; a schedule that sets `lr` moves both.

`device_lr=True` (CUDA graphs, `trelm_fast.graphs`): the learning rate lives in a 0-dim fp32
tensor on the parameters' device (a second one for the slices when `slice_lr_scale` != 1), updated
in place (`fill_`) when `lr` is set, and read on the device by both updates (fused AdamW with a
tensor lr, `capturable` on CUDA; the slice kernel through a pointer), so a captured step reads each
step's rate. Off, the rate is a Python float (no fill).

`step(skip)`: with a bool scalar tensor, the whole update (dense and slices, step counters included)
is dropped on the device when it is true (the fused AdamW's `found_inf`), so a step with a
non-finite loss needs no host sync.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trelm_fast.ffn import TrelmFFN, ffn_modules
from trelm_fast.kernels.slice_adamw import slice_adamw
from trelm_fast.models import parameter_group  # the groups of each family's parameter names

GROUPS = ("embeddings", "attention", "layernorm", "ffn", "ffn_out_bias", "head", "pooler", "other")
TRELM_TRAINABLE = frozenset({"embeddings", "head", "other"})
DENSE_TRAINABLE = frozenset(GROUPS)


def configure_trainable(model: nn.Module, trainable: Iterable[str] = TRELM_TRAINABLE) -> list[str]:
    """Set requires_grad of every parameter of `model`; returns the names left trainable.

    `trainable` holds group names (GROUPS) and/or fnmatch patterns over full parameter names
    (anything with '.', '*', '?' or '['), e.g. {"head", "other", "bert.encoder.layer.11.*"}.
    """
    trainable = set(trainable)
    patterns = {t for t in trainable if any(c in t for c in ".*?[")}
    unknown = trainable - patterns - set(GROUPS)
    if unknown:
        raise ValueError(f"configure_trainable: unknown group(s) {sorted(unknown)}; groups are {list(GROUPS)} "
                         "(or give fnmatch patterns over parameter names)")
    names = []
    for name, p in model.named_parameters():
        on = parameter_group(name) in trainable or any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(on)
        if on:
            names.append(name)
    return names


def _modules(model: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


def _dense_adamw(params: list[Tensor], lr: float | Tensor, betas, eps, weight_decay) -> torch.optim.Optimizer | None:
    if not params:
        return None
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    if isinstance(lr, Tensor) and not fused:
        raise ValueError("TrelmOptimizer: device_lr needs the fused AdamW (floating-point parameters on CPU or CUDA)")
    capturable = isinstance(lr, Tensor) and lr.device.type == "cuda"  # CUDA graphs: step counts read on the device
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, capturable=capturable)


class TrelmOptimizer:
    """Dense AdamW + lazy slice AdamW over the knowledge paths of `model`'s TrelmFFN layers.

    model: one module or several (e.g. the HF model and the trainer's knowledge projection).
    Dense parameters are those requiring grad at construction. Use: backward, (DDP:
    allreduce_slice_grads), step(), zero_grad(); set new paths after step()/zero_grad().
    `lr` may be changed between steps (schedules): `opt.lr = value`; the slices step at
    `lr * slice_lr_scale`; ``device_lr``: keep the rates in device tensors too (module docstring).
    """

    def __init__(self, model: nn.Module | Iterable[nn.Module], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, device_lr: bool = False, slice_lr_scale: float = 1.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or slice_lr_scale < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"TrelmOptimizer: invalid hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay} slice_lr_scale={slice_lr_scale}")
        mods = _modules(model)
        self.ffns: list[TrelmFFN] = list(dict.fromkeys(f for m in mods for f in ffn_modules(m)))
        seen, params = set(), []
        for m in mods:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        trained = params + [f.up.weight for f in self.ffns]
        self.lr_tensor = torch.tensor(float(lr), device=trained[0].device) if device_lr and trained else None
        self.slice_lr_scale = float(slice_lr_scale)
        self.slice_lr_tensor = self.lr_tensor
        if self.lr_tensor is not None and self.slice_lr_scale != 1.0:
            self.slice_lr_tensor = self.lr_tensor * self.slice_lr_scale
        self.dense = _dense_adamw(params, lr if self.lr_tensor is None else self.lr_tensor, self.betas, eps,
                                  weight_decay)
        self._lr = lr
        self.slice_state: list[dict[str, Tensor] | None] = [None] * len(self.ffns)

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = float(value)
        if self.lr_tensor is not None:
            self.lr_tensor.fill_(self._lr)
            if self.slice_lr_tensor is not self.lr_tensor:
                self.slice_lr_tensor.fill_(self._lr * self.slice_lr_scale)
        if self.dense is not None:
            for g in self.dense.param_groups:
                g["lr"] = self._lr if self.lr_tensor is None else self.lr_tensor

    def _slice_lr(self) -> float | Tensor:
        """The slices' rate, `lr * slice_lr_scale`: a float, or under ``device_lr`` its device tensor."""
        return self._lr * self.slice_lr_scale if self.slice_lr_tensor is None else self.slice_lr_tensor

    def trained_tensors(self) -> list[Tensor]:
        """What this optimizer updates from ``.grad``: the dense parameters, then the slice leaves of
        the current paths (`TrelmFFN.leaves`; new leaves after a change of path size)."""
        dense = [] if self.dense is None else [p for g in self.dense.param_groups for p in g["params"]]
        return dense + [t for f in self.ffns for t in f.leaves]

    def _targets(self, f: TrelmFFN):
        """(name, projection, parameter, slice leaf, weight decay) of one layer's sliced tensors."""
        s = f.slices
        out = [("w1", f.up, f.up.weight, s.w1, self.weight_decay), ("w2", f.down, f.down.weight, s.w2, self.weight_decay)]
        if s.b1 is not None:
            out.append(("b1", f.up, f.up.bias, s.b1, 0.0))
        g = f.gate_slices
        if g is not None:
            out.append(("wg", f.gate, f.gate.weight, g.wg, self.weight_decay))
            if g.bg is not None:
                out.append(("bg", f.gate, f.gate.bias, g.bg, 0.0))
        return out

    def _state_for(self, i: int) -> dict[str, Tensor]:
        if self.slice_state[i] is None:
            f = self.ffns[i]
            st = {"step": torch.zeros(f.intermediate_size, dtype=torch.int64, device=f.up.weight.device)}
            gate = f.gate
            for name, p in (("w1", f.up.weight), ("w2", f.down.weight), ("b1", f.up.bias),
                            ("wg", None if gate is None else gate.weight), ("bg", None if gate is None else gate.bias)):
                if p is not None:
                    st[f"exp_avg_{name}"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st[f"exp_avg_sq_{name}"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.slice_state[i] = st
        return self.slice_state[i]

    @torch.no_grad()
    def step(self, skip: Tensor | None = None) -> None:
        """Apply the gradients; ``skip``: a bool scalar tensor, true to change nothing (module docstring)."""
        if self.dense is not None:
            if skip is not None and not self.dense.defaults.get("fused"):
                if bool(skip):  # only the fused AdamW reads the flag on the device
                    return
                skip = None
            self.dense.found_inf = None if skip is None else skip.float()
            try:
                self.dense.step()
            finally:
                self.dense.found_inf = None
        b1, b2 = self.betas
        kept = None if skip is None else (~skip).long()  # 1, or 0 on a skipped step: what each step count gains
        for i, f in enumerate(self.ffns):
            if all(t.grad is None for t in f.leaves):
                continue
            st, idx = self._state_for(i), f.path
            st["step"].index_add_(0, idx, torch.ones_like(idx) if kept is None else kept.expand(idx.numel()))
            for name, proj, p, leaf, wd in self._targets(f):
                g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                m, v = st[f"exp_avg_{name}"], st[f"exp_avg_sq_{name}"]
                # nn.Linear-layout views, one per block of I neurons (two for a fused gate's halves)
                for p_b, m_b, v_b, g_b in zip(proj.neuron_blocks(p), proj.neuron_blocks(m), proj.neuron_blocks(v),
                                              proj.neuron_blocks(g, stored=False)):
                    slice_adamw(p_b, g_b, m_b, v_b, st["step"], idx, proj.axis if p.dim() == 2 else 0,
                                self._slice_lr(), b1, b2, self.eps, wd, skip)

    def zero_grad(self) -> None:
        """Drop dense and slice gradients (set to None)."""
        if self.dense is not None:
            self.dense.zero_grad(set_to_none=True)
        for f in self.ffns:
            for t in f.leaves:
                t.grad = None

    def state_dict(self) -> dict:
        """Tensors and Python scalars only (readable with torch.load(weights_only=True)); the same with
        and without ``device_lr`` (the rate and the `capturable` flag as an eager optimizer has them).
        `slice_lr_scale` is a setting, not state: the constructor's holds after a load."""
        dense = None if self.dense is None else self.dense.state_dict()
        if dense is not None and self.lr_tensor is not None:
            dense["param_groups"] = [{**g, "lr": self._lr, "capturable": False} for g in dense["param_groups"]]
        return {
            "lr": self._lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
            "dense": dense,
            "slices": [None if s is None else dict(s) for s in self.slice_state],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["slices"]) != len(self.ffns):
            raise ValueError(f"TrelmOptimizer.load_state_dict: state has {len(state['slices'])} FFN layers, "
                             f"the model has {len(self.ffns)}")
        if (state["dense"] is None) != (self.dense is None):
            raise ValueError("TrelmOptimizer.load_state_dict: dense state present in only one of state/optimizer "
                             "(were the same parameters trainable?)")
        self.betas, self.eps, self.weight_decay = tuple(state["betas"]), state["eps"], state["weight_decay"]
        if self.dense is not None:
            capturable = self.dense.param_groups[0]["capturable"]
            self.dense.load_state_dict(state["dense"])
            for g in self.dense.param_groups:
                g["capturable"] = capturable
        self.lr = state["lr"]  # and the device tensor into every group under device_lr
        for i, (f, s) in enumerate(zip(self.ffns, state["slices"])):
            if s is None:
                self.slice_state[i] = None
                continue
            dev = f.up.weight.device
            self.slice_state[i] = {k: v.to(dev) for k, v in s.items()}


def allreduce_slice_grads(model: nn.Module | Iterable[nn.Module], group=None) -> None:
    """Average the slice gradients of every TrelmFFN with a path across the ranks of `group`.

    All ranks must have set the same paths (select from reduced attribution scores). A missing
    gradient counts as zeros. One all_reduce over a flat buffer of all layers.
    """
    ffns = dict.fromkeys(f for m in _modules(model) for f in ffn_modules(m))
    leaves = [t for f in ffns for t in f.leaves]
    if not leaves:
        return
    for t in leaves:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    flat = torch.cat([t.grad.reshape(-1) for t in leaves])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for t, g in zip(leaves, flat.split([t.numel() for t in leaves])):
        t.grad.copy_(g.view_as(t))
