"""RoBERTa (`model_type` "roberta"): BERT's layer layout (`BertAdapter`); MLM head `lm_head`
(dense, GELU, layer_norm, decoder tied to the word embeddings, bias)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import RobertaForMaskedLM
from transformers.models.roberta.modeling_roberta import RobertaLayer

from trelm_fast.losses import MLMHead
from trelm_fast.models.base import register
from trelm_fast.models.bert import BertAdapter


class RobertaTransform(nn.Module):
    """RoBERTa's lm_head before the decoder: layer_norm(gelu(dense(h))), sharing the head's modules."""

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.dense = lm_head.dense
        self.layer_norm = lm_head.layer_norm

    def forward(self, h: Tensor) -> Tensor:
        return self.layer_norm(F.gelu(self.dense(h)))


@register
class RobertaAdapter(BertAdapter):
    family = "roberta"
    model_types = ("roberta",)
    layer_classes = (RobertaLayer,)
    mlm_class = RobertaForMaskedLM

    def mlm_head(self, model: nn.Module) -> MLMHead:
        lm_head = getattr(model, "lm_head", None)
        if lm_head is None or not hasattr(lm_head, "layer_norm"):
            raise TypeError(f"trelm_fast.models.{self.family}: {type(model).__name__} has no MLM head "
                            f"(`lm_head`); use {self.mlm_class.__name__}")
        return MLMHead(RobertaTransform(lm_head), lm_head.decoder, lm_head.bias)
