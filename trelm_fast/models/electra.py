"""ELECTRA (`model_type` "electra"): BERT's layer layout (`BertAdapter`).

Generator and discriminator are the same encoder; only `ElectraForMaskedLM` (the generator) has an
MLM head: `generator_predictions` (dense to embedding_size, GELU, LayerNorm) then
`generator_lm_head` (tied to the word embeddings, with bias). The discriminator
(`ElectraForPreTraining`) swaps and trains its FFNs like any model of the family, but attribution
and the MLM objective need the generator's head. When embedding_size != hidden_size the
embeddings are projected (`embeddings_project`) before the first layer.
"""
from __future__ import annotations

from torch import Tensor, nn
from transformers import ElectraForMaskedLM
from transformers.models.electra.modeling_electra import ElectraLayer

from trelm_fast.losses import MLMHead
from trelm_fast.models.base import register
from trelm_fast.models.bert import BertAdapter


@register
class ElectraAdapter(BertAdapter):
    family = "electra"
    model_types = ("electra",)
    layer_classes = (ElectraLayer,)
    mlm_class = ElectraForMaskedLM

    def mlm_head(self, model: nn.Module) -> MLMHead:
        predictions, lm_head = getattr(model, "generator_predictions", None), getattr(model, "generator_lm_head", None)
        if predictions is None or lm_head is None:
            raise TypeError(f"trelm_fast.models.{self.family}: {type(model).__name__} has no MLM head "
                            "(`generator_predictions` + `generator_lm_head`); use ElectraForMaskedLM (the generator)")
        return MLMHead(predictions, lm_head, lm_head.bias)

    def parameter_group(self, parts: list[str]) -> str | None:
        if parts[0] in ("generator_predictions", "generator_lm_head"):
            return "head"
        return "embeddings" if "embeddings_project" in parts else None

    def embedding_output(self, model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        base = self.base(model)
        h = base.embeddings(inputs_embeds=inputs_embeds)
        return base.embeddings_project(h) if hasattr(base, "embeddings_project") else h
