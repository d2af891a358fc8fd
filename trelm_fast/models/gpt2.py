"""GPT-2 (`model_type` "gpt2"): a decoder with pre-LayerNorm `GPT2Block`s and `Conv1D` projections.

a = h + attn(ln_1(h)) (causal mask; positions enter as learned embeddings `wpe`); the MLP reads
x = ln_2(a): v = act(c_fc x), the layer output is a + c_proj(v) (the MLP's dropout follows
c_proj). `Conv1D` computes y = x W + b with W stored [in, out], so c_fc holds W1^T [d, I] (neurons
are its columns) and c_proj holds W2^T [I, d] (neurons are its rows): `transposed` in the FFN site,
and `SliceConv1D` slices them with leaves in nn.Linear layout (w1 [|S|, d], w2 [d, |S|]) like
every family. `ln_f` follows the last layer; `lm_head` (tied to `wte`, no bias) scores tokens.
Causal like Llama (docs/models.md "Decoders in the trainer"). The FFN width is `n_inner` (None:
4 d).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import GPT2LMHeadModel
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.pytorch_utils import Conv1D

from trelm_fast.ffn import PathSliced
from trelm_fast.models.base import CausalLMAdapter, FFNSite, Site, register


def _sharing(cls: type, conv: Conv1D) -> Conv1D:
    """A `cls` (Conv1D or a subclass) holding `conv`'s Parameter objects (nothing allocated)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.nf, new.nx, new.weight, new.bias = conv.nf, conv.nx, conv.weight, conv.bias
    new.train(conv.training)
    return new


class SliceConv1D(PathSliced, Conv1D):
    """GPT-2's Conv1D (weight [in, out]) with knowledge-path slice gradients (`trelm_fast.ffn.PathSliced`):
    its nn.Linear-layout weight is the transposed view, so the slices and leaves are as for SliceLinear."""

    wraps = Conv1D

    @classmethod
    def from_plain(cls, conv: Conv1D, axis: int, blocks: int = 1) -> "SliceConv1D":
        new = _sharing(cls, conv)
        new._init_slicing(axis, blocks)
        return new

    def to_plain(self) -> Conv1D:
        return _sharing(Conv1D, self)

    def linear_layout(self, t: Tensor) -> Tensor:
        return t.t() if t.dim() == 2 else t

    def dense_forward(self, x: Tensor) -> Tensor:
        return Conv1D.forward(self, x)

    def __repr__(self) -> str:
        return f"SliceConv1D(nf={self.nf}, nx={self.nx}, {self.slicing_repr()})"


@register
class GPT2Adapter(CausalLMAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    layer_classes = (GPT2Block,)
    mlm_class = GPT2LMHeadModel
    size_attrs = {**CausalLMAdapter.size_attrs, "intermediate_size": "n_inner"}  # the others are config aliases

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).h

    def ffn_site(self, layer: nn.Module) -> FFNSite:
        mlp = layer.mlp
        return FFNSite(Site(mlp, "c_fc"), Site(mlp, "c_proj"), mlp.act, transposed=True)

    def sliced_class(self) -> type:
        return SliceConv1D

    def layer_context(self, model: nn.Module, mask2d: Tensor, like: Tensor):
        """The causal layer mask HF builds for a [B, n] padding mask (None, a 4D tensor or a block mask)."""
        position_ids = torch.arange(like.shape[1], device=like.device)[None]
        return create_causal_mask(config=model.config, inputs_embeds=like, attention_mask=mask2d,
                                  past_key_values=None, position_ids=position_ids)

    def attention(self, layer: nn.Module, h: Tensor, ctx) -> Tensor:
        return h + layer.attn(layer.ln_1(h), attention_mask=ctx)[0]

    def ffn_input(self, layer: nn.Module, a: Tensor) -> Tensor:
        return layer.ln_2(a)

    def layer_output(self, layer: nn.Module, f: Tensor, a: Tensor) -> Tensor:
        return a + f

    def final_norm(self, model: nn.Module, h: Tensor) -> Tensor:
        return self.base(model).ln_f(h)

    def embedding_output(self, model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        base = self.base(model)
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        return base.drop(inputs_embeds + base.wpe(positions))

    def set_dropout(self, config, p: float) -> None:
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = p

    def parameter_group(self, parts: list[str]) -> str | None:
        """`wte`/`wpe`/`lm_head` (embeddings), `ln_f` (layernorm); in `h.{i}`: `ln_1`/`ln_2`
        (layernorm), `attn.*` (attention), `mlp.c_fc.*` and `mlp.c_proj.weight` (ffn),
        `mlp.c_proj.bias` (ffn_out_bias)."""
        owner = parts[-2:-1]  # the module holding the parameter ([] for a top-level one)
        if parts[0] == "lm_head" or owner in (["wte"], ["wpe"]):
            return "embeddings"
        if owner == ["ln_f"]:
            return "layernorm"
        if "h" not in parts:
            return None
        if owner in (["ln_1"], ["ln_2"]):
            return "layernorm"
        if "attn" in parts:
            return "attention"
        if parts[-3:] == ["mlp", "c_proj", "bias"]:
            return "ffn_out_bias"
        return "ffn" if parts[-3:-1] in (["mlp", "c_fc"], ["mlp", "c_proj"]) else None
