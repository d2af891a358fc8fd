"""The ``hf`` source: a corpus as a `datasets` dataset on disk (save_to_disk, parquet, arrow, JSON lines)."""
import json

import numpy as np
import pytest

from trelm_fast.data.__main__ import main as cli
from trelm_fast.data.formats import BadRecords, DataFormatError, read_corpus
from trelm_fast.data.loader import load_entities
from trelm_fast.data.sources.hf import read_hf_corpus

datasets = pytest.importorskip("datasets")  # the `hf` extra; a GPU machine as it comes lacks it

ROWS = [
    {"text": "Bob met Ann in Paris.", "entities": [{"start": 0, "end": 3, "id": "e:bob"},
                                                   {"start": 15, "end": 20, "id": "e:paris"}]},
    {"text": "Ann left.", "entities": []},
    {"text": "Paris is large.", "entities": [{"start": 0, "end": 5, "id": "e:paris"}]},
]


def write(rows, path, kind):
    """``rows`` as a dataset at ``path`` in format ``kind``; returns what --path takes."""
    ds = datasets.Dataset.from_list(rows)
    if kind == "save_to_disk":
        ds.save_to_disk(str(path))
    elif kind == "dataset_dict":
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    elif kind == "parquet":
        path = path.with_suffix(".parquet")
        ds.to_parquet(str(path))
    elif kind == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "arrow_dir":  # a directory of .arrow shards, as save_to_disk leaves them without its json
        ds.save_to_disk(str(path))
        for f in ("dataset_info.json", "state.json"):
            (path / f).unlink()
    return path


@pytest.mark.parametrize("kind", ["save_to_disk", "dataset_dict", "parquet", "jsonl", "arrow_dir"])
def test_reads_the_documents_of_each_format(tmp_path, kind):
    docs = list(read_hf_corpus(write(ROWS, tmp_path / "corpus", kind)))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    want = list(read_corpus(tmp_path / "c.jsonl"))
    assert [(d.text, d.entities) for d in docs] == [(d.text, d.entities) for d in want]


def test_other_column_names(tmp_path):
    rows = [{"body": r["text"], "links": r["entities"]} for r in ROWS]
    docs = list(read_hf_corpus(write(rows, tmp_path / "c", "parquet"), text_column="body", entities_column="links"))
    assert [d.text for d in docs] == [r["text"] for r in ROWS]
    with pytest.raises(DataFormatError, match=r"field 'text': no such column \(columns: \['body', 'links'\]\)"):
        list(read_hf_corpus(tmp_path / "c.parquet"))


def test_bad_rows_name_path_and_row(tmp_path):
    rows = ROWS + [{"text": "Zed.", "entities": [{"start": 0, "end": 9, "id": "e:zed"}]},
                   {"text": "", "entities": []}]
    path = write(rows, tmp_path / "c", "parquet")
    with pytest.raises(DataFormatError, match=rf"{path}:4: field 'entities\[0\].start': span \[0, 9\) out of range"):
        list(read_hf_corpus(path))
    bad = BadRecords("skip")
    assert len(list(read_hf_corpus(path, bad))) == 3
    assert bad.total == 2 and any(":5: field 'text': empty text" in e for e in bad.examples)


def test_unusable_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="--path: no such file or directory"):
        list(read_hf_corpus(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no dataset files in the directory"):
        list(read_hf_corpus(tmp_path / "empty"))
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(DataFormatError, match="unknown dataset file type '.csv'"):
        list(read_hf_corpus(tmp_path / "c.csv"))
    path = tmp_path / "dd"
    datasets.DatasetDict({"valid": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    with pytest.raises(DataFormatError, match=r"DatasetDict without a 'train' split \(has \['valid'\]\)"):
        list(read_hf_corpus(path))


@pytest.mark.slow
def test_cli_hf_source_builds_what_the_files_source_builds(tiny_dir, tmp_path, capsys):
    rows = [json.loads(line) for line in (tiny_dir / "corpus.jsonl").read_text().splitlines()]
    path = write(rows, tmp_path / "corpus", "save_to_disk")
    out = tmp_path / "hf_ds"
    args = ["build", "--source", "hf", "--path", str(path), "--kg", str(tiny_dir / "kg.tsv"),
            "--probes", str(tiny_dir / "probes.jsonl"), "--out", str(out), "--quiet", "--transe-epochs", "10",
            "--transe-dim", "16"]
    assert cli(args) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["documents"] == len(rows)
    assert np.array_equal(np.load(out / "train_tokens.npy"), np.load(tiny_dir / "train_tokens.npy"))
    named = [[(s, e, load_entities(d)[i], t) for s, e, i, t, *_ in np.load(d / "train_spans.npy").tolist()]
             for d in (out, tiny_dir)]
    assert named[0] == named[1]
    assert cli(["build", "--source", "hf", "--kg", str(tiny_dir / "kg.tsv"), "--out", str(tmp_path / "z")]) == 2
    assert "source 'hf' needs the dataset and kg paths (--path, --kg)" in capsys.readouterr().err
