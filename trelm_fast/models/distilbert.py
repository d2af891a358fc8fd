"""DistilBERT (`model_type` "distilbert"): post-LayerNorm `TransformerBlock`s.

a = sa_layer_norm(attention(h) + h); FFN W1 = `layer.ffn.lin1` [I, d], act = `ffn.activation`,
W2 = `layer.ffn.lin2` [d, I]; the layer output is `output_layer_norm(W2 v + b2 + a)`. MLM head:
`vocab_transform`, activation, `vocab_layer_norm`, then `vocab_projector` (tied to the word
embeddings, with bias). Parameter names: `distilbert.transformer.layer.{i}.{attention,
sa_layer_norm, ffn.lin1, ffn.lin2, output_layer_norm}`.
"""
from __future__ import annotations

from torch import Tensor, nn
from transformers import DistilBertForMaskedLM
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.distilbert.modeling_distilbert import TransformerBlock

from trelm_fast.losses import MLMHead
from trelm_fast.models.base import FamilyAdapter, FFNSite, Site, register


class DistilBertTransform(nn.Module):
    """The MLM head before the projector: vocab_layer_norm(act(vocab_transform(h))), the model's own modules."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vocab_transform, self.activation = model.vocab_transform, model.activation
        self.vocab_layer_norm = model.vocab_layer_norm

    def forward(self, h: Tensor) -> Tensor:
        return self.vocab_layer_norm(self.activation(self.vocab_transform(h)))


@register
class DistilBertAdapter(FamilyAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    layer_classes = (TransformerBlock,)
    mlm_class = DistilBertForMaskedLM
    size_attrs = {**FamilyAdapter.size_attrs, "intermediate_size": "hidden_dim"}  # not in its attribute_map

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).transformer.layer

    def ffn_site(self, layer: nn.Module) -> FFNSite:
        return FFNSite(Site(layer.ffn, "lin1"), Site(layer.ffn, "lin2"), layer.ffn.activation)

    def layer_context(self, model: nn.Module, mask2d: Tensor, like: Tensor):
        return create_bidirectional_mask(config=model.config, inputs_embeds=like, attention_mask=mask2d)

    def attention(self, layer: nn.Module, h: Tensor, ctx) -> Tensor:
        return layer.sa_layer_norm(layer.attention(h, attention_mask=ctx)[0] + h)

    def layer_output(self, layer: nn.Module, f: Tensor, a: Tensor) -> Tensor:
        return layer.output_layer_norm(f + a)

    def mlm_head(self, model: nn.Module) -> MLMHead:
        if not hasattr(model, "vocab_projector"):
            raise TypeError(f"trelm_fast.models.{self.family}: {type(model).__name__} has no MLM head "
                            "(`vocab_projector`); use DistilBertForMaskedLM")
        return MLMHead(DistilBertTransform(model), model.vocab_projector, model.vocab_projector.bias)

    def embedding_output(self, model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.base(model).embeddings(None, inputs_embeds)

    def set_dropout(self, config, p: float) -> None:
        config.dropout = config.attention_dropout = p

    def parameter_group(self, parts: list[str]) -> str | None:
        if parts[0] in ("vocab_transform", "vocab_layer_norm", "vocab_projector"):
            return "head"
        if "transformer" not in parts or "layer" not in parts:
            return None
        if parts[-2] in ("sa_layer_norm", "output_layer_norm"):
            return "layernorm"
        if "attention" in parts:
            return "attention"
        if parts[-3:-1] == ["ffn", "lin2"] and parts[-1] == "bias":
            return "ffn_out_bias"
        return "ffn" if "ffn" in parts else None
