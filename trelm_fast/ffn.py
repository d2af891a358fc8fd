"""Drop-in TRELM FFN: knowledge-path slice gradients for the FFN layers of any supported family (paper section 3.3).

A layer's FFN is Y = act(X W1^T + b1) W2^T + b2 with W1 [I, d] (the up projection) and W2 [d, I]
(the down projection); where they are in each family's layers is the family adapter's business
(`trelm_fast.models`, docs/models.md). A knowledge path is a sorted set S of intermediate
neurons. While a path is set, the backward computes only

    dW1[S, :] = dPre[:, S]^T X,   db1[S] = sum_t dPre[t, S],   dW2[:, S] = dY^T A[:, S]

(dPre = (dY W2) * act'(pre), A = act(pre)) and the exact input gradient dX. Full-size dW1 / dW2
never exist: W1, b1, W2 enter the autograd Functions detached, and small zero-valued "slice" leaves
(`TrelmFFN.slices`: w1 [|S|, d], b1 [|S|], w2 [d, |S|], requires_grad=True) receive the slice
gradients in their `.grad` (summed over micro-batches like any leaf). The leaves are not module
parameters, so DDP never sees them; `trelm_fast.optim.allreduce_slice_grads` reduces them.

Gated MLPs, Y = (act(X G^T) * (X W1^T + b1)) W2^T + b2, take rows S of the gate G too (`TrelmFFN.gate_slices`);
a fused gate ([G; W1] as one Linear [2I, d], ModernBERT) takes its rows S and I + S.

`swap_ffn(model)` replaces the up, down (and gate) nn.Linear of every layer with `SliceLinear` (an
nn.Linear subclass holding the same Parameter objects, so parameter names and state dicts are
unchanged; families with other projection modules give their own `PathSliced` class, GPT-2 its
Conv1D's) and adds a parameter-free `TrelmFFN` child `layer.trelm_ffn` that owns the path.
Everything else of the layer (activation, LayerNorm, dropout, hooks) stays the Hugging Face
module. With no path set a swapped model computes exactly what the original computes (same ops),
gradients included.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trelm_fast.kernels.sparse_ffn import column_slice_grad, gather_columns, gathered_tn_matmul

if TYPE_CHECKING:  # trelm_fast.models imports this module (family PathSliced classes)
    from trelm_fast.models.base import Site


def _flat(t: Tensor) -> Tensor:
    """[..., k] -> [T, k] (tokens on dim 0)."""
    return t.reshape(-1, t.shape[-1])


def gather_index(path: Tensor, n: int) -> Tensor | None:
    """The gather index of a sorted unique path over n neurons: None (no gather) when S is all of them."""
    return None if path.numel() == n else path


class RowSliceLinear(torch.autograd.Function):
    """y = x W^T + b with weight gradient only for output rows `idx`.

    forward(x [..., d_in], weight [d_out, d_in] (detached), bias [d_out] | None (detached),
    idx [k] int64 (None: every row, no gather), w_slice [k, d_in] leaf, b_slice [k] leaf | None)
    -> y [..., d_out].
    backward: dx = dy W (exact), w_slice.grad += dy[:, idx]^T x, b_slice.grad += sum_t dy[t, idx].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, idx, w_slice, b_slice):
        ctx.save_for_backward(x, weight, idx)
        ctx.slice_dtypes = (w_slice.dtype, None if b_slice is None else b_slice.dtype)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, idx = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight.to(dy.dtype)).to(x.dtype)
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            dw, db = gathered_tn_matmul(_flat(dy), _flat(x), a_idx=idx, colsum=ctx.needs_input_grad[5])
            dw = dw.to(ctx.slice_dtypes[0]) if ctx.needs_input_grad[4] else None
            db = db.to(ctx.slice_dtypes[1]) if ctx.needs_input_grad[5] else None
        return dx, None, None, None, dw, db


class ColSliceLinear(torch.autograd.Function):
    """y = a W^T + b with weight gradient only for input columns `idx`.

    forward(a [..., d_in], weight [d_out, d_in] (detached), bias [d_out] | None (trains if it
    requires grad), idx [k] int64 (None: every column), w_slice [d_out, k] leaf) -> y [..., d_out].
    Only a[..., idx] is kept for the backward.
    backward: da = dy W (exact), w_slice.grad += dy^T a[:, idx], db = sum_t dy.
    """

    @staticmethod
    def forward(ctx, a, weight, bias, idx, w_slice):
        a_s = None
        if ctx.needs_input_grad[4]:
            a_s = _flat(a) if idx is None else gather_columns(_flat(a), idx)
        ctx.save_for_backward(weight, a_s)
        ctx.a_dtype, ctx.slice_dtype = a.dtype, w_slice.dtype
        return F.linear(a, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, a_s = ctx.saved_tensors
        da = dw = db = None
        if ctx.needs_input_grad[0]:
            da = (dy @ weight.to(dy.dtype)).to(ctx.a_dtype)
        if ctx.needs_input_grad[2]:
            db = _flat(dy).sum(0)
        if ctx.needs_input_grad[4]:
            dw = column_slice_grad(_flat(dy), a_s).to(ctx.slice_dtype)
        return da, None, db, None, dw


class PathSliced:
    """Mixin of an FFN projection module whose weight gradient, while `path` is set, is a slice.

    In nn.Linear terms (weight [out, in], `linear_weight`): axis 0 (up, gate projections): output
    features `path` -> leaves `weight_slice` [blocks * k, in], `bias_slice` [blocks * k]; axis 1
    (down projection): input features `path` -> leaf `weight_slice` [out, k], the bias keeps its
    own requires_grad. `blocks` (axis 0 only): the output features stack that many blocks of
    `num_neurons` (a fused GLU projection: 2), a path S takes features b * num_neurons + S of each.
    With `path is None` the module is exactly its plain class (`dense_forward`). Subclasses:
    `SliceLinear` (nn.Linear) here, a family's own types in its adapter module (GPT-2's Conv1D);
    `wraps` is the plain class, `from_plain` / `to_plain` convert sharing the Parameter objects.
    """

    wraps: type = nn.Module

    def _init_slicing(self, axis: int, blocks: int) -> None:
        if axis not in (0, 1):
            raise ValueError(f"{type(self).__name__}: axis must be 0 (rows) or 1 (columns), got {axis}")
        if blocks < 1 or (axis == 1 and blocks != 1):
            raise ValueError(f"{type(self).__name__}: blocks must be >= 1, and 1 for axis 1, got {blocks}")
        self.axis, self.blocks = axis, blocks
        self.path: Tensor | None = None
        self.weight_slice: Tensor | None = None
        self.bias_slice: Tensor | None = None

    @classmethod
    def from_plain(cls, module: nn.Module, axis: int, blocks: int = 1) -> "PathSliced":
        raise NotImplementedError

    def to_plain(self) -> nn.Module:
        raise NotImplementedError

    def linear_layout(self, t: Tensor) -> Tensor:
        """A tensor shaped like the stored weight (or bias), as nn.Linear lays it out (a view)."""
        return t

    @property
    def linear_weight(self) -> Tensor:
        """The weight as nn.Linear's [out, in] (a view)."""
        return self.linear_layout(self.weight)

    def dense_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def num_neurons(self) -> int:
        """I, the neurons along `axis` (features per block)."""
        return self.linear_weight.shape[self.axis] // self.blocks

    def neuron_blocks(self, t: Tensor, stored: bool = True) -> tuple[Tensor, ...]:
        """Views of `t` in nn.Linear layout, one per block of features along `axis` (a bias: its
        only axis); `t` is shaped like the stored weight or bias (`stored`), or is in nn.Linear
        layout already (a slice leaf). No op at all for one block in nn.Linear layout."""
        if stored:
            t = self.linear_layout(t)
        return (t,) if self.blocks == 1 else t.chunk(self.blocks, dim=self.axis if t.dim() == 2 else 0)

    def _gather_index(self) -> Tensor | None:
        """The features of the path along `axis` (every block), None when that is all of them."""
        n = self.num_neurons
        idx = gather_index(self.path, n)
        if idx is None or self.blocks == 1:
            return idx
        return torch.cat([idx + b * n for b in range(self.blocks)])

    def _set_path(self, idx: Tensor | None) -> None:
        """Install a validated path and fresh zero slice leaves (or clear them). ``idx`` (int64, on
        the weight's device) becomes the module's path buffer as it is: `TrelmFFN.set_path` passes
        one buffer of its own to all its projections and later copies same-size paths into it."""
        self.path, self.weight_slice, self.bias_slice = idx, None, None
        if idx is None:
            return
        w = self.linear_weight
        k = idx.numel() * self.blocks
        shape = (k, w.shape[1]) if self.axis == 0 else (w.shape[0], k)
        self.weight_slice = torch.zeros(shape, device=w.device, dtype=w.dtype, requires_grad=True)
        if self.axis == 0 and self.bias is not None:
            self.bias_slice = torch.zeros(k, device=w.device, dtype=self.bias.dtype, requires_grad=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.path is None:
            return self.dense_forward(x)
        if self.path.device != self.weight.device:
            raise RuntimeError(
                f"{type(self).__name__}: path is on {self.path.device} but the weight is on {self.weight.device}; "
                "set paths after moving the model"
            )
        idx = self._gather_index()
        w = self.linear_weight.detach()
        if self.axis == 0:
            bias = None if self.bias is None else self.bias.detach()
            return RowSliceLinear.apply(x, w, bias, idx, self.weight_slice, self.bias_slice)
        return ColSliceLinear.apply(x, w, self.bias, idx, self.weight_slice)

    def slicing_repr(self) -> str:
        k = "None" if self.path is None else str(self.path.numel())
        return f"axis={self.axis}, blocks={self.blocks}, path_size={k}"


class SliceLinear(PathSliced, nn.Linear):
    """An nn.Linear whose weight gradient, while `path` is set, is a slice along `axis` (`PathSliced`)."""

    wraps = nn.Linear

    def __init__(self, in_features: int, out_features: int, axis: int, bias: bool = True,
                 device=None, dtype=None, blocks: int = 1):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_slicing(axis, blocks)

    @classmethod
    def from_plain(cls, linear: nn.Linear, axis: int, blocks: int = 1) -> "SliceLinear":
        """A SliceLinear sharing `linear`'s Parameter objects (no copy)."""
        new = cls(linear.in_features, linear.out_features, axis, bias=linear.bias is not None,
                  device="meta", blocks=blocks)
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return new

    def to_plain(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's Parameter objects."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        lin.train(self.training)
        return lin

    def dense_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.slicing_repr()}"


class FFNSlices(NamedTuple):
    """Slice leaves of one layer's path S: w1 [|S|, d], b1 [|S|] (None without bias), w2 [d, |S|]
    (nn.Linear layout whatever the storage; a fused gate's up projection: w1 [2|S|, d], b1 [2|S|],
    its rows S then I + S)."""

    w1: Tensor
    b1: Tensor | None
    w2: Tensor


class GateSlices(NamedTuple):
    """Slice leaves of a gated MLP's gate rows on the path S: wg [|S|, d], bg [|S|] (None without bias)."""

    wg: Tensor
    bg: Tensor | None


class TrelmFFN(nn.Module):
    """Path controller of one layer's FFN (registered as `layer.trelm_ffn`).

    Holds no parameters: `up` (W1 [I, d], b1), `down` (W2 [d, I], b2) and, in gated MLPs, `gate`
    (G [I, d], rows sliced like W1) are the layer's own `PathSliced` modules (SliceLinear, or the
    family's type), referenced but not registered here (no parameter has two names); `sites` says
    which module owns each under which attribute name (what `unswap_ffn` restores).
    """

    def __init__(self, up: Site, down: Site, layer_idx: int, gate: Site | None = None):
        super().__init__()
        sites = (up, down) if gate is None else (up, down, gate)
        for name, site in zip(("up", "down", "gate"), sites):
            if not isinstance(site.linear, PathSliced):
                raise TypeError(f"TrelmFFN: the {name} projection must be PathSliced, got "
                                f"{type(site.linear).__name__}")
        object.__setattr__(self, "sites", sites)
        self.layer_idx = layer_idx

    @property
    def up(self) -> PathSliced:
        """W1 [I, d], b1 [I]: the up projection."""
        return self.sites[0].linear

    @property
    def down(self) -> PathSliced:
        """W2 [d, I], b2 [d]: the down projection."""
        return self.sites[1].linear

    @property
    def gate(self) -> PathSliced | None:
        """G [I, d]: the gate projection of a gated MLP, else None."""
        return self.sites[2].linear if len(self.sites) > 2 else None

    @property
    def linears(self) -> tuple[PathSliced, ...]:
        """Every sliced projection of the layer's FFN (up, down[, gate])."""
        return tuple(site.linear for site in self.sites)

    @property
    def intermediate_size(self) -> int:
        return self.down.num_neurons

    @property
    def path(self) -> Tensor | None:
        """Sorted unique neuron ids (int64, on the weights' device) or None (dense behaviour)."""
        return self.up.path

    @property
    def slices(self) -> FFNSlices | None:
        """The slice leaves of the current path; their `.grad` holds the slice gradients."""
        if self.path is None:
            return None
        return FFNSlices(self.up.weight_slice, self.up.bias_slice, self.down.weight_slice)

    @property
    def gate_slices(self) -> GateSlices | None:
        """The gate's slice leaves of the current path (gated MLPs only)."""
        gate = self.gate
        if self.path is None or gate is None:
            return None
        return GateSlices(gate.weight_slice, gate.bias_slice)

    @property
    def leaves(self) -> list[Tensor]:
        """Every slice leaf of the current path, of all projections (empty without a path)."""
        return [t for lin in self.linears for t in (lin.weight_slice, lin.bias_slice) if t is not None]

    def set_path(self, indices: Tensor | None) -> None:
        """Set the knowledge path S (sorted unique ids in [0, I)) or clear it with None.

        A path of as many ids as the current one, on the same device, is copied into the current
        path buffer in place and the slice leaves stay (still zero, without gradients): what a
        captured CUDA graph of the step points at stays valid (`trelm_fast.graphs`), which is every
        refresh under the default rule `top_fraction`. Otherwise the path buffer is a new copy of
        ``indices`` (never the caller's tensor, which a later in-place update would overwrite) and
        the slice leaves are fresh zeros. Refuses while the current leaves hold gradients (call the
        optimizer's step()/zero_grad() first, otherwise those gradients would be lost).
        """
        where = f"TrelmFFN.set_path (layer {self.layer_idx})"
        if any(t.grad is not None for t in self.leaves):
            raise RuntimeError(f"{where}: the current path still holds slice gradients; "
                               "call optimizer.step() or zero_grad() before changing paths")
        if indices is None:
            idx = None
        else:
            if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.is_floating_point() \
                    or indices.is_complex() or indices.dtype == torch.bool:
                raise ValueError(f"{where}: indices must be a 1-D integer tensor, got "
                                 f"{type(indices).__name__} {getattr(indices, 'dtype', '')} "
                                 f"{tuple(getattr(indices, 'shape', ()))}")
            idx, n = indices, self.intermediate_size  # checked where given (host indices: no device sync)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{where}: indices must lie in [0, {n}), got range "
                                 f"[{int(idx.min())}, {int(idx.max())}]")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"{where}: indices must be sorted and unique")
        device, current = self.up.weight.device, self.path
        if idx is not None and current is not None and current.numel() == idx.numel() and current.device == device:
            current.copy_(idx)  # shared by every projection of the layer
            return
        if idx is not None:
            idx = idx.to(device=device, dtype=torch.int64, copy=True)
        for lin in self.linears:
            lin._set_path(idx)

    def extra_repr(self) -> str:
        k = "None" if self.path is None else str(self.path.numel())
        return f"layer_idx={self.layer_idx}, intermediate_size={self.intermediate_size}, path_size={k}"


def swap_ffn(model: nn.Module) -> nn.Module:
    """Put a TrelmFFN into every layer of `model` (a model of a supported family), in place; returns `model`.

    The family adapter (`trelm_fast.models.adapter_for`, from `model.config.model_type`) says where
    each layer's FFN is. Layers already swapped are left alone. Parameter names and values are
    unchanged.
    """
    from trelm_fast.models import adapter_for

    adapter = adapter_for(model, "swap_ffn")
    for i, layer in enumerate(adapter.layers(model)):
        if isinstance(getattr(layer, "trelm_ffn", None), TrelmFFN):
            continue
        site, sliced = adapter.ffn_site(layer), adapter.sliced_class()
        projections = site.projections()
        for proj, _, _ in projections:
            if type(proj.linear) is not sliced.wraps:
                raise TypeError(f"swap_ffn: layer {i} {type(proj.owner).__name__}.{proj.name} is "
                                f"{type(proj.linear).__name__}, expected {sliced.wraps.__module__}."
                                f"{sliced.wraps.__qualname__}")
        for proj, axis, blocks in projections:
            setattr(proj.owner, proj.name, sliced.from_plain(proj.linear, axis, blocks))
        layer.trelm_ffn = TrelmFFN(site.up, site.down, i, site.gate)
    return model


def unswap_ffn(model: nn.Module) -> nn.Module:
    """Undo swap_ffn in place (the plain nn.Linear / family modules back, paths dropped); returns `model`."""
    for layer in [m for m in model.modules() if isinstance(getattr(m, "trelm_ffn", None), TrelmFFN)]:
        for site in layer.trelm_ffn.sites:
            setattr(site.owner, site.name, site.linear.to_plain())
        del layer.trelm_ffn
    return model


def ffn_modules(model: nn.Module) -> list[TrelmFFN]:
    """The TrelmFFN of every swapped layer, in layer order."""
    return [m for m in model.modules() if isinstance(m, TrelmFFN)]


@contextmanager
def suspended_paths(model: nn.Module) -> Iterator[None]:
    """Run `model` as if no path were set (e.g. attribution passes that need only input gradients).

    Inside, every sliced projection is its plain module, so autograd computes no slice gradients; the
    paths, slice leaves and any gradients they hold are restored on exit.
    """
    linears = [lin for f in ffn_modules(model) for lin in f.linears]
    saved = [lin.path for lin in linears]
    for lin in linears:
        lin.path = None
    try:
        yield
    finally:
        for lin, path in zip(linears, saved):
            lin.path = path


def trelm_ffn(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, act,
              path: Tensor | None = None, slices: FFNSlices | None = None) -> Tensor:
    """Functional FFN act(x W1^T + b1) W2^T + b2 ([..., d] -> [..., d]), no dropout/LayerNorm.

    With `path` and `slices` (leaves shaped as in FFNSlices) the weight gradients go to the slices
    only; without, plain autograd over w1/b1/w2/b2. For benchmarks and tests.
    """
    if path is None:
        return F.linear(act(F.linear(x, w1, b1)), w2, b2)
    if slices is None:
        raise ValueError("trelm_ffn: a path needs its slice leaves (slices=FFNSlices(...))")
    idx = gather_index(path, w1.shape[0])
    h = RowSliceLinear.apply(x, w1.detach(), None if b1 is None else b1.detach(), idx, slices.w1, slices.b1)
    return ColSliceLinear.apply(act(h), w2.detach(), b2, idx, slices.w2)
