"""The knowledge-corpus data pipeline: formats, sources, alignment, SI, TransE, build, loader.

Build a dataset with ``python -m trelm_fast.data build --source ... --out DIR`` (docs/data.md);
read it with :mod:`trelm_fast.data.loader`. Heavy modules are imported lazily.
"""
from importlib import import_module

_EXPORTS = {
    "DataFormatError": "formats", "BadRecords": "formats", "Document": "formats", "Mention": "formats",
    "Probe": "formats",
    "BuildConfig": "build", "build_dataset": "build", "GeneratedConfig": "generated", "build_generated": "generated",
    "TrelmDataset": "loader", "MLMCollator": "loader", "ResumableSampler": "loader", "load_manifest": "loader",
    "check_tokenizer": "loader", "load_entities": "loader", "load_relations": "loader",
    "load_entity_tokens": "loader", "load_kg_embeddings": "loader", "load_probes": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
