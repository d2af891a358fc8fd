"""Llama (`model_type` "llama"): a decoder with pre-RMSNorm layers and a gated MLP.

a = h + self_attn(input_layernorm(h)) (rotary position embeddings, causal mask); the MLP reads
x = post_attention_layernorm(a): v = act(gate_proj x) * (up_proj x), a path S takes rows S of
`gate_proj` and `up_proj` and columns S of `down_proj`; the layer output is a + down_proj(v). The
final `model.norm` follows the last layer; `lm_head` (no bias) scores tokens. Causal: the hidden
state at t - 1 predicts the token at t (docs/models.md "Decoders in the trainer" says what TRELM's
targets, injection and memory bank mean there).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from trelm_fast.models.base import CausalLMAdapter, FFNSite, Site, register


class LlamaContext(NamedTuple):
    mask: object  # what create_causal_mask returns: None, a 4D tensor or a block mask
    position_embeddings: tuple[Tensor, Tensor]  # rotary (cos, sin)


@register
class LlamaAdapter(CausalLMAdapter):
    family = "llama"
    model_types = ("llama",)
    layer_classes = (LlamaDecoderLayer,)
    mlm_class = LlamaForCausalLM

    def set_sizes(self, config, sizes: dict[str, int]) -> None:
        """As the base, and a new head count keeps multi-head attention (key/value heads = heads)
        where the config had it; grouped-query attention must still divide the heads."""
        mha = config.num_key_value_heads == config.num_attention_heads
        super().set_sizes(config, sizes)
        if mha:
            config.num_key_value_heads = config.num_attention_heads
        elif config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"model.num_heads {config.num_attention_heads} is not a multiple of the "
                             f"config's num_key_value_heads {config.num_key_value_heads}")

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).layers

    def ffn_site(self, layer: nn.Module) -> FFNSite:
        mlp = layer.mlp
        return FFNSite(Site(mlp, "up_proj"), Site(mlp, "down_proj"), mlp.act_fn, Site(mlp, "gate_proj"))

    def layer_context(self, model: nn.Module, mask2d: Tensor, like: Tensor) -> LlamaContext:
        position_ids = torch.arange(like.shape[1], device=like.device)[None]
        mask = create_causal_mask(config=model.config, inputs_embeds=like, attention_mask=mask2d,
                                  past_key_values=None, position_ids=position_ids)
        return LlamaContext(mask, self.base(model).rotary_emb(like, position_ids=position_ids))

    def attention(self, layer: nn.Module, h: Tensor, ctx: LlamaContext) -> Tensor:
        out, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=ctx.mask,
                                 position_embeddings=ctx.position_embeddings)
        return h + out

    def ffn_input(self, layer: nn.Module, a: Tensor) -> Tensor:
        return layer.post_attention_layernorm(a)

    def layer_output(self, layer: nn.Module, f: Tensor, a: Tensor) -> Tensor:
        return a + f

    def final_norm(self, model: nn.Module, h: Tensor) -> Tensor:
        return self.base(model).norm(h)

    def embedding_output(self, model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return inputs_embeds  # no position or type embeddings: positions enter through the rotary attention

    def set_dropout(self, config, p: float) -> None:
        config.attention_dropout = p

    def parameter_group(self, parts: list[str]) -> str | None:
        if parts[0] == "lm_head" or "embed_tokens" in parts:
            return "embeddings"  # the [V, d] output matrix (tied or not), grouped like BERT's decoder
        if "layers" not in parts:  # the final norm: `model.norm` (other families' `*.norm` are theirs)
            return "layernorm" if parts[:-1] in (["norm"], ["model", "norm"]) else None
        if parts[-2:-1] in (["input_layernorm"], ["post_attention_layernorm"]):
            return "layernorm"
        if "self_attn" in parts:
            return "attention"
        if parts[-3:-1] in (["mlp", "gate_proj"], ["mlp", "up_proj"], ["mlp", "down_proj"]):
            return "ffn_out_bias" if parts[-2:] == ["down_proj", "bias"] else "ffn"
        return None
