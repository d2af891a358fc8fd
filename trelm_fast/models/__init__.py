"""Model families through one adapter each (docs/models.md).

`adapter_for(model)` finds a model's adapter from `model.config.model_type`; `supported_model_types()`
lists them. Adding a family is adding one module here (a `FamilyAdapter` subclass decorated with
`@register`, imported below) and its entry in tests/test_models.py.
"""
from trelm_fast.models import (  # noqa: F401  (registers the families; bert first: its naming rules)
    bert, deberta_v2, distilbert, electra, gpt2, llama, modernbert, roberta, xlm_roberta,
)
from trelm_fast.models.base import (
    TRANSFORMERS_RANGE,
    FamilyAdapter,
    FFNSite,
    Site,
    adapter_for,
    adapter_for_type,
    check_transformers_version,
    parameter_group,
    supported_model_types,
)

__all__ = ["TRANSFORMERS_RANGE", "FamilyAdapter", "FFNSite", "Site", "adapter_for", "adapter_for_type",
           "check_transformers_version", "parameter_group", "supported_model_types"]
