"""The adapter contract: what trelm-fast needs to know about one model family, and the registry.

Every use of transformers internals (module classes, attribute names, mask builders) lives in a
family module of this package; the rest of trelm-fast talks to a model through its adapter:

- `layers(model)`: the Transformer layers, in order.
- `ffn_site(layer)`: where the FFN is. Up projection W1 [I, d] (rows are neurons), activation,
  down projection W2 [d, I] (columns are neurons), each projection as the module that owns the
  nn.Linear and the attribute name, so `swap_ffn` can replace it in place; gated MLPs add a gate
  projection G [I, d] whose rows are sliced like W1's, or fuse it into the up projection
  (`fused_gate`); `transposed` marks weights stored [in, out] (GPT-2's Conv1D), and
  `sliced_class()` names the `trelm_fast.ffn.PathSliced` class that replaces the projections.
- One layer split at its FFN, what the attribution needs, for hidden states h [B, n, d]:
  `layer_context(model, mask2d, like)` (whatever one layer needs besides h: the attention mask the
  family builds from a [B, n] padding mask), `attention(layer, h, ctx)` -> a (the state the FFN
  reads, [B, n, d]), `neurons(layer, a)` -> v = act(W1 x + b1) [B, n, I] (post-activation values;
  x = `ffn_input(layer, a)`), `layer_output(layer, f, a)` -> the layer output given
  f = v W2^T + b2, and `final_norm(model, h)` after the last layer. All per position except
  `attention`. `causal` marks decoders (the state at t - 1 predicts the token at t).
- `mlm_head(model)` (a `losses.MLMHead` over the model's own modules), `embedding_output(model,
  inputs_embeds, attention_mask)` (what the first layer reads), `mlm_class` (the LM class
  `build_mlm` makes: a masked LM, for decoders the causal LM), `parameter_group(parts)` (the `trelm_fast.optim` group of the family's
  parameter names).

The optional fast path of the fused attribution (`attention_at`: the last layer's attention state at
the target positions only) defaults to running the whole layer and indexing.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import transformers
from packaging.version import Version
from torch import Tensor, nn

from trelm_fast.losses import MLMHead

TRANSFORMERS_RANGE = ("5.0", "6.0")  # supported transformers versions: >= first, < second


def check_transformers_version(family: str) -> None:
    """Raise a RuntimeError naming the supported range when the installed transformers is outside it."""
    lo, hi = TRANSFORMERS_RANGE
    have = Version(transformers.__version__)
    if not Version(lo) <= have < Version(hi):
        raise RuntimeError(f"trelm_fast.models.{family}: transformers {transformers.__version__} is installed; "
                           f"the {family} adapter supports transformers >= {lo}, < {hi}")


class Positions(NamedTuple):
    """Positions in a batch of sequences [C, n, ..] (the fused attribution's targets): rows, cols
    and slot [N] (the position's rank among its row's positions, row-major order), and `per_row`
    (host int: the most positions any row has), so that the fast paths size their tensors
    without reading the device."""

    rows: Tensor
    cols: Tensor
    slot: Tensor
    per_row: int


class Site(NamedTuple):
    """One projection of the FFN: `getattr(owner, name)` is the nn.Linear (or the family's
    projection module), or its sliced counterpart once swapped."""

    owner: nn.Module
    name: str

    @property
    def linear(self) -> nn.Linear:
        return getattr(self.owner, self.name)


class FFNSite(NamedTuple):
    """Where one layer's FFN is: up W1 [I, d], down W2 [d, I], the activation, and for gated MLPs
    the gate G [I, d] (v = act(G x) * (W1 x + b1)), else None.

    Two storage layouts besides one nn.Linear per projection: `fused_gate` (ModernBERT's `Wi`): the
    up projection stacks [G; W1] as one Linear [2I, d] and v = act(first half) * second half, so a
    path S takes its rows S and I + S; `transposed` (GPT-2's `Conv1D`): every weight is stored
    [in, out], W1 as [d, I] and W2 as [I, d].
    """

    up: Site
    down: Site
    act: Callable[[Tensor], Tensor]
    gate: Site | None = None
    fused_gate: bool = False
    transposed: bool = False

    @property
    def width(self) -> int:
        """I, the FFN's neurons: the down projection's input features."""
        return self.down.linear.weight.shape[0 if self.transposed else 1]

    def projections(self) -> list[tuple[Site, int, int]]:
        """(site, axis, blocks) of each projection: axis 0 where neurons are output features (up,
        gate), 1 where they are input features (down); blocks: stacked [I]-feature blocks (2 for a
        fused gate), a path S takes features b * I + S of each."""
        out = [(self.up, 0, 2 if self.fused_gate else 1), (self.down, 1, 1)]
        return out if self.gate is None else out + [(self.gate, 0, 1)]

    def linear_weight(self, site: Site) -> Tensor:
        """A projection's weight in nn.Linear layout [out, in] (a view of a transposed weight)."""
        w = site.linear.weight
        return w.t() if self.transposed else w

    def neuron_dim(self, axis: int) -> int:
        """The dim of a projection's stored weight that holds its features along `axis`."""
        return 1 - axis if self.transposed else axis


class FamilyAdapter:
    """Base of the per-family adapters; subclasses set `family`, `model_types`, `layer_classes`."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    layer_classes: tuple[type, ...] = ()
    causal: bool = False  # decoders: the hidden state at t - 1 predicts the token at t
    size_attrs: dict[str, str] = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                                  "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
                                  "max_position_embeddings": "max_position_embeddings"}
    """`ModelConfig` size field -> the family's config attribute (what `build_mlm` sets for a random init)."""

    def set_sizes(self, config, sizes: dict[str, int]) -> None:
        """Set `ModelConfig` size fields (`size_attrs` keys) on the family's config (a random init)."""
        for field, value in sizes.items():
            setattr(config, self.size_attrs[field], value)

    # ------------------------------------------------------------------ structure

    def base(self, model: nn.Module) -> nn.Module:
        """The family's base model (e.g. `BertModel`) of any head model or of itself."""
        return getattr(model, "base_model", model)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The Transformer layers of `model`, checked to be the family's layer classes."""
        layers = self.layer_list(model)
        for i, layer in enumerate(layers):
            if not isinstance(layer, self.layer_classes):
                names = ", ".join(c.__name__ for c in self.layer_classes)
                raise TypeError(f"trelm_fast.models.{self.family}: layer {i} of {type(model).__name__} is "
                                f"{type(layer).__name__}, expected {names}")
        return layers

    def ffn_site(self, layer: nn.Module) -> FFNSite:
        raise NotImplementedError

    def sliced_class(self) -> type:
        """The path-sliced module class `swap_ffn` puts in place of each FFN projection (a
        `trelm_fast.ffn.PathSliced`): `SliceLinear` for nn.Linear projections."""
        from trelm_fast.ffn import SliceLinear  # ffn imports this module

        return SliceLinear

    # ------------------------------------------------------------------ one layer, split at the FFN

    def layer_context(self, model: nn.Module, mask2d: Tensor, like: Tensor) -> Any:
        raise NotImplementedError

    def attention(self, layer: nn.Module, h: Tensor, ctx: Any) -> Tensor:
        raise NotImplementedError

    def ffn_input(self, layer: nn.Module, a: Tensor) -> Tensor:
        """x, what the FFN reads from the attention state a (pre-LayerNorm layers normalize a)."""
        return a

    def neurons(self, layer: nn.Module, a: Tensor) -> Tensor:
        """v = act(W1 x + b1), gated act(G x) * (W1 x + b1), with x = ffn_input(a): [.., I]."""
        site = self.ffn_site(layer)
        x = self.ffn_input(layer, a)
        up = site.up.linear(x)
        if site.fused_gate:
            g, up = up.chunk(2, dim=-1)
            return site.act(g) * up
        return site.act(up) if site.gate is None else site.act(site.gate.linear(x)) * up

    def final_norm(self, model: nn.Module, h: Tensor) -> Tensor:
        """What follows the last layer before the head (pre-LayerNorm models: a final norm)."""
        return h

    def layer_output(self, layer: nn.Module, f: Tensor, a: Tensor) -> Tensor:
        raise NotImplementedError

    def ffn_out(self, layer: nn.Module, v: Tensor, a: Tensor) -> Tensor:
        """The layer output given neurons v [.., I] and attention state a [.., d]."""
        return self.layer_output(layer, self.ffn_site(layer).down.linear(v), a)

    # ------------------------------------------------------------------ fused-attribution fast paths

    def attention_at(self, layer: nn.Module, h: Tensor, ctx: Any, at: Positions) -> Tensor:
        """The attention state at the positions `at` only, [N, d] (default: the full layer, indexed)."""
        return self.attention(layer, h, ctx)[at.rows, at.cols]

    # ------------------------------------------------------------------ heads and embeddings

    mlm_class: type | None = None

    def mlm_head(self, model: nn.Module) -> MLMHead:
        raise NotImplementedError

    def embedding_output(self, model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """What the first layer reads, from word embeddings [B, n, d_emb] (and the [B, n] padding
        mask, for families whose embeddings use it)."""
        return self.base(model).embeddings(inputs_embeds=inputs_embeds)

    def set_dropout(self, config, p: float) -> None:
        """Set every dropout probability of a config of this family to p."""
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = p

    def parameter_group(self, parts: list[str]) -> str | None:
        """The `trelm_fast.optim` group of a parameter name split at '.', or None when this
        family's naming does not decide it."""
        return None


class CausalLMAdapter(FamilyAdapter):
    """Base of the decoder families: causal, scored by the `*ForCausalLM` model's `lm_head` (no
    transform; a zero bias when it has none). Subclasses set `mlm_class` to that causal-LM class."""

    causal = True

    def mlm_head(self, model: nn.Module) -> MLMHead:
        lm_head = getattr(model, "lm_head", None)
        if lm_head is None:
            raise TypeError(f"trelm_fast.models.{self.family}: {type(model).__name__} has no LM head; "
                            f"use {self.mlm_class.__name__}")
        bias = lm_head.bias if lm_head.bias is not None else lm_head.weight.new_zeros(lm_head.out_features)
        return MLMHead(nn.Identity(), lm_head, bias)


_REGISTRY: dict[str, FamilyAdapter] = {}


def register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: make the family's adapter the one for its `model_types`."""
    adapter = cls()
    for t in cls.model_types:
        _REGISTRY[t] = adapter
    return cls


def parameter_group(name: str) -> str:
    """The `trelm_fast.optim` group of a parameter name: the first family whose naming decides it
    (in registration order), else "other" (e.g. the trainer's own modules)."""
    parts = name.split(".")
    for adapter in dict.fromkeys(_REGISTRY.values()):
        group = adapter.parameter_group(parts)
        if group is not None:
            return group
    return "other"


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def adapter_for_type(model_type: str, where: str = "trelm_fast") -> FamilyAdapter:
    """The adapter of a `config.model_type`; a ValueError listing the supported ones otherwise."""
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(supported_model_types())})")
    check_transformers_version(adapter.family)
    return adapter


def adapter_for(model: nn.Module, where: str = "trelm_fast") -> FamilyAdapter:
    """The adapter of a Hugging Face model, found from `model.config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
        found = type(lists[0][0]).__name__ if lists else "no layer list"
        raise TypeError(f"{where}: {type(model).__name__} is not a Hugging Face model with a "
                        f"config.model_type (its first layer list holds {found}); supported model types: "
                        f"{', '.join(supported_model_types())}")
    return adapter_for_type(model_type, where)
