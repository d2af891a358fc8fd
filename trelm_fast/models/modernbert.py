"""ModernBERT (`model_type` "modernbert"): pre-LayerNorm encoder layers with a fused gated MLP.

a = h + attn(attn_norm(h)) (layer 0's attn_norm is the identity; rotary position embeddings;
each layer is `full_attention` or `sliding_attention`, with its own mask and rotary embeddings);
the MLP reads x = mlp_norm(a): `mlp.Wi` [2I, d] projects to both GLU halves at once, `input, gate
= Wi(x).chunk(2)` and v = act(input) * gate, so in trelm-fast's terms Wi = [G; W1] (a fused gate:
a path S takes rows S and I + S of Wi and columns S of `mlp.Wo` [d, I]); the layer output is a +
Wo(v) (the MLP's dropout sits before Wo). `final_norm` follows the last layer. MLM head: `head`
(dense, activation, LayerNorm) then `decoder` (tied to the word embeddings, with bias). The
embeddings are LayerNorm + dropout of the word embeddings (no position embeddings).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import ModernBertForMaskedLM
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask
from transformers.models.modernbert.modeling_modernbert import ModernBertEncoderLayer

from trelm_fast.losses import MLMHead
from trelm_fast.models.base import FamilyAdapter, FFNSite, Site, register


class ModernBertContext(NamedTuple):
    """Per layer type ("full_attention", "sliding_attention"): the attention mask (None, a 4D
    tensor or a block mask) and the rotary (cos, sin)."""

    masks: dict[str, object]
    position_embeddings: dict[str, tuple[Tensor, Tensor]]


@register
class ModernBertAdapter(FamilyAdapter):
    family = "modernbert"
    model_types = ("modernbert",)
    layer_classes = (ModernBertEncoderLayer,)
    mlm_class = ModernBertForMaskedLM

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).layers

    def ffn_site(self, layer: nn.Module) -> FFNSite:
        mlp = layer.mlp
        return FFNSite(Site(mlp, "Wi"), Site(mlp, "Wo"), mlp.act, fused_gate=True)

    def layer_context(self, model: nn.Module, mask2d: Tensor, like: Tensor) -> ModernBertContext:
        base = self.base(model)
        kwargs = {"config": model.config, "inputs_embeds": like, "attention_mask": mask2d}
        masks = {"full_attention": create_bidirectional_mask(**kwargs),
                 "sliding_attention": create_bidirectional_sliding_window_mask(**kwargs)}
        position_ids = torch.arange(like.shape[1], device=like.device)[None]
        rotary = {t: base.rotary_emb(like, position_ids, t) for t in set(model.config.layer_types)}
        return ModernBertContext(masks, rotary)

    def attention(self, layer: nn.Module, h: Tensor, ctx: ModernBertContext) -> Tensor:
        kind = layer.attention_type
        out, _ = layer.attn(layer.attn_norm(h), position_embeddings=ctx.position_embeddings[kind],
                            attention_mask=ctx.masks[kind])
        return h + out

    def ffn_input(self, layer: nn.Module, a: Tensor) -> Tensor:
        return layer.mlp_norm(a)

    def layer_output(self, layer: nn.Module, f: Tensor, a: Tensor) -> Tensor:
        return a + f

    def final_norm(self, model: nn.Module, h: Tensor) -> Tensor:
        return self.base(model).final_norm(h)

    def mlm_head(self, model: nn.Module) -> MLMHead:
        if not isinstance(getattr(model, "decoder", None), nn.Linear):
            raise TypeError(f"trelm_fast.models.{self.family}: {type(model).__name__} has no MLM head "
                            "(`head` + `decoder`); use ModernBertForMaskedLM")
        decoder = model.decoder
        bias = decoder.bias if decoder.bias is not None else decoder.weight.new_zeros(decoder.out_features)
        return MLMHead(model.head, decoder, bias)

    def set_dropout(self, config, p: float) -> None:
        config.embedding_dropout = config.attention_dropout = config.mlp_dropout = p

    def parameter_group(self, parts: list[str]) -> str | None:
        """`head.*`, `decoder.bias` (head), `decoder.weight` (the tied word embeddings); in
        `layers.{i}`: `attn_norm`/`mlp_norm` (layernorm), `attn.*` (attention), `mlp.Wi.*` and
        `mlp.Wo.weight` (ffn), `mlp.Wo.bias` (ffn_out_bias); `final_norm` (layernorm)."""
        if parts[0] == "head" or parts == ["decoder", "bias"]:
            return "head"
        if parts == ["decoder", "weight"]:
            return "embeddings"
        if "final_norm" in parts:
            return "layernorm"
        if "layers" not in parts:
            return None
        if parts[-2:-1] in (["attn_norm"], ["mlp_norm"]):
            return "layernorm"
        if "attn" in parts:
            return "attention"
        if parts[-3:-1] == ["mlp", "Wo"] and parts[-1] == "bias":
            return "ffn_out_bias"
        return "ffn" if parts[-3:-1] in (["mlp", "Wi"], ["mlp", "Wo"]) else None
