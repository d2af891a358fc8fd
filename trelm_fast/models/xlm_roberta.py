"""XLM-RoBERTa (`model_type` "xlm-roberta"): RoBERTa's layers and MLM head under other class names."""
from __future__ import annotations

from transformers import XLMRobertaForMaskedLM
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer

from trelm_fast.models.base import register
from trelm_fast.models.roberta import RobertaAdapter


@register
class XLMRobertaAdapter(RobertaAdapter):
    family = "xlm_roberta"
    model_types = ("xlm-roberta",)
    layer_classes = (XLMRobertaLayer,)
    mlm_class = XLMRobertaForMaskedLM
