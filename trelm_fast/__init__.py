"""trelm-fast: fast TRELM knowledge-enhanced pre-training for Hugging Face masked LMs (and decoders).

`apply_trelm(model)` (Liger-style) puts the TRELM FFN into every layer of a model of a supported
family, found from `model.config.model_type` (docs/models.md); it is `swap_ffn`, and
`unswap_ffn` undoes it. Public names are imported lazily so that `python -m trelm_fast.data`
stays quick.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {  # public name -> (module, name there)
    "EntityTable": ("trelm_fast.entity_table", "EntityTable"),
    "KnowledgeMemoryBank": ("trelm_fast.memory_bank", "KnowledgeMemoryBank"),
    "TrelmFFN": ("trelm_fast.ffn", "TrelmFFN"),
    "apply_trelm": ("trelm_fast.ffn", "swap_ffn"),
    "supported_model_types": ("trelm_fast.models", "supported_model_types"),
    "swap_ffn": ("trelm_fast.ffn", "swap_ffn"),
    "unswap_ffn": ("trelm_fast.ffn", "unswap_ffn"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'trelm_fast' has no attribute {name!r}")
