"""The ``files`` source: a corpus JSONL, a KG TSV and probe JSONL files supplied by the user."""
from __future__ import annotations

from pathlib import Path

from ..formats import BadRecords, read_corpus, read_kg, read_probes
from . import RawData


def require_files(**paths: str | Path | None) -> None:
    """Raise FileNotFoundError naming the option (``kg`` -> ``--kg``) of the first given path that is
    not a file; None means not given."""
    for name, p in paths.items():
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')}: no such file: {p}")


def kg_and_probes(kg: str | Path, probes: str | Path | None, probes_heldout: str | Path | None,
                  bad: BadRecords) -> dict:
    """The ``triples``, ``probes`` and ``probes_heldout`` fields of a RawData, read from files."""
    return {"triples": read_kg(kg, bad),
            "probes": read_probes(probes, bad) if probes else [],
            "probes_heldout": read_probes(probes_heldout, bad) if probes_heldout else []}


def load_files(corpus: str | Path, kg: str | Path, probes: str | Path | None = None,
               probes_heldout: str | Path | None = None, bad: BadRecords | None = None) -> RawData:
    """Read and validate the files; bad records raise or are counted by ``bad``."""
    bad = bad or BadRecords()
    require_files(corpus=corpus, kg=kg, probes=probes, probes_heldout=probes_heldout)
    return RawData(documents=list(read_corpus(corpus, bad)), **kg_and_probes(kg, probes, probes_heldout, bad),
                   stats={"corpus": str(corpus), "kg": str(kg)})
