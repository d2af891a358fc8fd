"""The ``hf`` source: a corpus held as a Hugging Face ``datasets`` dataset on disk, a KG TSV and
optional probe JSONL files (the formats of :mod:`trelm_fast.data.formats`).

``path`` is a directory written by ``Dataset.save_to_disk`` (a ``DatasetDict`` must have a
``train`` split), or one or more Arrow (``.arrow``), Parquet (``.parquet``) or JSON Lines
(``.json``/``.jsonl``) files, or a directory holding such files. Nothing is fetched from the hub.
Each row is a corpus document: a string column ``text`` and a column ``entities``, a list of
``{"start": int, "end": int, "id": str}`` (character offsets, end exclusive); other column names
are given with ``text_column``/``entities_column``. A bad row is reported like a bad corpus line,
as ``PATH:ROW`` with ROW counted from 1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..formats import BadRecords, DataFormatError, Document, _Cursor, parse_document
from . import RawData
from .files import kg_and_probes, require_files

BUILDERS = {".arrow": "arrow", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def _data_files(path: Path) -> tuple[str, list[str]]:
    """(datasets builder name, files) for a file or a directory of files of one known format."""
    files = sorted(p for p in path.iterdir() if p.suffix in BUILDERS) if path.is_dir() else [path]
    if not files:
        raise DataFormatError(path, None, None, f"no dataset files in the directory (expected "
                              f"save_to_disk output or {', '.join(BUILDERS)} files)")
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise DataFormatError(path, None, None, f"unknown dataset file type {files[0].suffix!r} "
                              f"(expected one of {', '.join(BUILDERS)})")
    if len(kinds) > 1:
        raise DataFormatError(path, None, None, f"mixed dataset file types {sorted(kinds)}")
    return kinds.pop(), [str(p) for p in files]


def load_corpus_dataset(path: str | Path):
    """The ``datasets.Dataset`` at ``path`` (see module docstring), read from disk only."""
    try:
        import datasets
    except ImportError:
        raise ValueError("source 'hf' needs the `datasets` package: pip install 'trelm-fast[hf]'") from None

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--path: no such file or directory: {path}")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataFormatError(path, None, None, f"DatasetDict without a 'train' split (has {list(ds)})")
            ds = ds["train"]
        return ds
    builder, files = _data_files(path)
    return datasets.load_dataset(builder, data_files=files, split="train", keep_in_memory=True)


def read_hf_corpus(path: str | Path, bad: BadRecords | None = None, text_column: str = "text",
                   entities_column: str = "entities") -> Iterator[Document]:
    """Yield the valid documents of the dataset at ``path``; bad rows raise or are counted by ``bad``."""
    bad = bad or BadRecords()
    ds = load_corpus_dataset(path)
    missing = [c for c in (text_column, entities_column) if c not in ds.column_names]
    if missing:
        raise DataFormatError(path, None, missing[0], f"no such column (columns: {ds.column_names})")
    for row, (text, entities) in enumerate(zip(ds[text_column], ds[entities_column]), 1):
        doc = parse_document(_Cursor(str(path), row, bad, "corpus"), {"text": text, "entities": entities})
        if doc is not None:
            yield doc


def load_hf(path: str | Path, kg: str | Path, probes: str | Path | None = None,
            probes_heldout: str | Path | None = None, bad: BadRecords | None = None,
            text_column: str = "text", entities_column: str = "entities") -> RawData:
    """Read and validate the corpus dataset, the KG and the probes; bad records raise or are counted."""
    bad = bad or BadRecords()
    require_files(kg=kg, probes=probes, probes_heldout=probes_heldout)
    return RawData(documents=list(read_hf_corpus(path, bad, text_column, entities_column)),
                   **kg_and_probes(kg, probes, probes_heldout, bad), stats={"corpus": str(path), "kg": str(kg)})
