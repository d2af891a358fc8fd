"""DeBERTa-v2 / v3 (`model_type` "deberta-v2"): BERT's FFN layout (`intermediate.dense`,
`output.dense`, `output.LayerNorm(W2 v + b2 + a)`) under disentangled relative-position attention.

One layer needs, besides h, the encoder's [B, 1, n, n] attention mask (`get_attention_mask`), the
relative positions (`get_rel_pos`) and the (normalized) relative embeddings
(`get_rel_embedding`): that triple is the layer context. The embeddings zero padded positions
(`mask=attention_mask`). Models with the first-layer convolution (`conv_kernel_size > 0`, some
DeBERTa-v2 checkpoints) are refused: its output mixes in the embeddings after layer 0's FFN.
MLM head: `cls.predictions` (legacy) or `lm_predictions.lm_head` (decoder = the word embeddings).
Only eager attention exists for this family.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from transformers import DebertaV2ForMaskedLM
from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Layer

from trelm_fast.losses import MLMHead
from trelm_fast.models.base import FamilyAdapter, FFNSite, Site, register


class DebertaContext(NamedTuple):
    mask: Tensor  # [B, 1, n, n]
    relative_pos: Tensor | None
    rel_embeddings: Tensor | None


class DebertaTransform(nn.Module):
    """lm_predictions.lm_head before the decoder: LayerNorm(act(dense(h))), the head's own modules."""

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.dense, self.transform_act_fn, self.LayerNorm = lm_head.dense, lm_head.transform_act_fn, lm_head.LayerNorm

    def forward(self, h: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(h)))


@register
class DebertaV2Adapter(FamilyAdapter):
    family = "deberta_v2"
    model_types = ("deberta-v2",)
    layer_classes = (DebertaV2Layer,)
    mlm_class = DebertaV2ForMaskedLM

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        encoder = self.base(model).encoder
        if encoder.conv is not None:
            raise TypeError(f"trelm_fast.models.{self.family}: {type(model).__name__} has the first-layer "
                            f"convolution (conv_kernel_size={model.config.conv_kernel_size}), which is not supported")
        return encoder.layer

    def ffn_site(self, layer: nn.Module) -> FFNSite:
        return FFNSite(Site(layer.intermediate, "dense"), Site(layer.output, "dense"),
                       layer.intermediate.intermediate_act_fn)

    def layer_context(self, model: nn.Module, mask2d: Tensor, like: Tensor) -> DebertaContext:
        encoder = self.base(model).encoder
        return DebertaContext(encoder.get_attention_mask(mask2d), encoder.get_rel_pos(like),
                              encoder.get_rel_embedding())

    def attention(self, layer: nn.Module, h: Tensor, ctx: DebertaContext) -> Tensor:
        return layer.attention(h, ctx.mask, relative_pos=ctx.relative_pos, rel_embeddings=ctx.rel_embeddings)[0]

    def layer_output(self, layer: nn.Module, f: Tensor, a: Tensor) -> Tensor:
        return layer.output.LayerNorm(f + a)

    def mlm_head(self, model: nn.Module) -> MLMHead:
        predictions = getattr(getattr(model, "cls", None), "predictions", None)
        if predictions is not None:
            return MLMHead(predictions.transform, predictions.decoder, predictions.bias)
        lm_head = getattr(getattr(model, "lm_predictions", None), "lm_head", None)
        if lm_head is None:
            raise TypeError(f"trelm_fast.models.{self.family}: {type(model).__name__} has no MLM head; "
                            "use DebertaV2ForMaskedLM")
        return MLMHead(DebertaTransform(lm_head), model.get_input_embeddings(), lm_head.bias)

    def embedding_output(self, model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.base(model).embeddings(inputs_embeds=inputs_embeds, mask=attention_mask)

    def parameter_group(self, parts: list[str]) -> str | None:
        if parts[0] == "lm_predictions":
            return "head"
        if "encoder" in parts and "layer" not in parts:  # the relative-position embeddings and their LayerNorm
            return "embeddings"
        return None
