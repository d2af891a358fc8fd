"""trelm-fast: fast TRELM knowledge-enhanced pre-training for BERT/RoBERTa-style encoders.

Public names are imported lazily so that `python -m trelm_fast.data` stays quick.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "EntityTable": "trelm_fast.entity_table",
    "KnowledgeMemoryBank": "trelm_fast.memory_bank",
    "TrelmFFN": "trelm_fast.ffn",
    "swap_ffn": "trelm_fast.ffn",
    "unswap_ffn": "trelm_fast.ffn",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trelm_fast' has no attribute {name!r}")
