"""Dataset sources: each produces a :class:`RawData` (documents, KG triples, probes) in memory.

- ``synthetic``: generated, deterministic from a seed (:mod:`.synthetic`);
- ``wiki-geo``: the Wikipedia excerpt in the gensim wheel + GeoNames facts (:mod:`.wiki_geo`);
- ``files``: user files in the formats of :mod:`trelm_fast.data.formats` (:mod:`.files`).
- ``hf``: a corpus as a Hugging Face ``datasets`` dataset on disk, KG and probes as ``files`` (:mod:`.hf`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..formats import Document, Probe


@dataclass
class RawData:
    """What a source hands to the build.

    documents: corpus documents (mentions carry string entity ids);
    triples: KG (head, relation, tail) string ids;
    probes: facts stated in the corpus, probed with templates not used in it;
    probes_heldout: KG facts never stated in the corpus (used only for probes);
    entity_names: surface name per entity id (for memory-bank initialization); entities with
    no name here are named by their most frequent mention text, else by their id;
    stats: source-specific counts, copied into the summary.
    """

    documents: list[Document]
    triples: list[tuple[str, str, str]]
    probes: list[Probe]
    probes_heldout: list[Probe]
    entity_names: dict[str, str] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
