"""The ``files`` source: a corpus JSONL, a KG TSV and probe JSONL files supplied by the user."""
from __future__ import annotations

from pathlib import Path

from ..formats import BadRecords, read_corpus, read_kg, read_probes
from . import RawData


def load_files(corpus: str | Path, kg: str | Path, probes: str | Path | None = None,
               probes_heldout: str | Path | None = None, bad: BadRecords | None = None) -> RawData:
    """Read and validate the files; bad records raise or are counted by ``bad``."""
    bad = bad or BadRecords()
    for name, p in (("--corpus", corpus), ("--kg", kg), ("--probes", probes), ("--probes-heldout", probes_heldout)):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{name}: no such file: {p}")
    docs = list(read_corpus(corpus, bad))
    triples = read_kg(kg, bad)
    return RawData(
        documents=docs,
        triples=triples,
        probes=read_probes(probes, bad) if probes else [],
        probes_heldout=read_probes(probes_heldout, bad) if probes_heldout else [],
        stats={"corpus": str(corpus), "kg": str(kg)},
    )
