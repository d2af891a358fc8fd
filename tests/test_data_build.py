"""Build pipeline: synthetic determinism and long tail, targets, atomic output, bad input, manifest."""
import json
import re
from collections import Counter

import numpy as np
import pytest

from trelm_fast.data import build as build_mod
from trelm_fast.data.__main__ import main as cli
from trelm_fast.data.base_model import load_tokenizer, tokenizer_identity
from trelm_fast.data.build import BuildConfig, build_dataset
from trelm_fast.data.formats import BadRecords, DataFormatError, Document, Mention, Probe, read_kg, write_corpus
from trelm_fast.data.loader import load_entities, load_manifest, load_relations
from trelm_fast.data.sources import RawData
from trelm_fast.data.sources.synthetic import generate

FAST = dict(transe_epochs=10, transe_dim=16)


def _small_raw(docs, triples=(("e:a", "r", "e:b"),), probes=()):
    return RawData([Document(t, [Mention(*m) for m in ms], "corpus.jsonl", i + 1) for i, (t, ms) in enumerate(docs)],
                   list(triples), list(probes), [])


def test_synthetic_deterministic_and_seeded():
    a, b, c = generate("tiny", seed=3), generate("tiny", seed=3), generate("tiny", seed=4)
    assert a == b
    assert a.documents != c.documents
    assert len({r for _, r, _ in a.triples}) == 6


def test_synthetic_zipf_long_tail():
    raw = generate("small", seed=0)
    counts = Counter(m.id for d in raw.documents for m in d.entities if m.id.startswith("syn:person:"))
    freq = np.array(sorted(counts.values(), reverse=True))
    assert freq[0] > 50 * np.median(freq)       # a head...
    assert (freq <= 2).mean() > 0.3             # ...and a real long tail
    r = np.arange(1, 51)
    slope = np.polyfit(np.log(r), np.log(freq[:50]), 1)[0]
    assert -1.6 < slope < -0.6                  # rank-frequency slope near -s (s = 1.1)


def test_synthetic_corpus_phrased_counts_the_sentences_stating_each_fact():
    from trelm_fast.data.sources.synthetic import RELATIONS, corpus_phrased

    raw = generate("tiny", seed=2)
    stated = corpus_phrased(raw.probes, raw.documents)
    assert all(n >= 1 and p.template == RELATIONS[p.relation][1][0] for p, n in stated)  # every probe is said
    assert sum(n for _, n in stated) <= sum(d.text.count(".") for d in raw.documents)  # at most one per sentence
    assert all(n == 0 for _, n in corpus_phrased(raw.probes_heldout, raw.documents))  # never said
    assert max(n for _, n in stated) > 1


def test_build_deterministic(tmp_path):
    raw = generate("tiny", seed=1)
    raw.documents = raw.documents[:12]
    s1 = build_dataset(raw, tmp_path / "a", BuildConfig(**FAST), progress=False)
    build_dataset(raw, tmp_path / "b", BuildConfig(**FAST), progress=False)
    fa, fb = (load_manifest(tmp_path / x)["files"] for x in "ab")
    assert fa == fb and s1["documents"] == 12


def test_select_targets_stated_objects_first():
    # one sequence: a long-tail subject (entity 0) and the object (entity 1) of a fact it states
    spans = np.array([[1, 3, 0], [5, 6, 1]])
    si, has_triple = np.array([2.0, 1.5]), np.array([True, True])
    long_tail = np.array([True, False])
    default = build_mod.select_targets(spans, si, long_tail, has_triple, 1.0, 1, False)
    objects = build_mod.select_targets(spans, si, long_tail, has_triple, 1.0, 1, False, np.array([False, True]))
    assert default.tolist() == [True, False] and objects.tolist() == [False, True]


def test_build_stated_objects_first_targets_the_objects_probes_ask_for(tmp_path):
    raw = generate("tiny", seed=1)
    raw.documents = raw.documents[:20]
    kinds = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        build_dataset(raw, out, BuildConfig(stated_objects_first=flag, **FAST), progress=False)
        ents = load_entities(out)
        spans = np.load(out / "train_spans.npy")
        kinds[flag] = Counter(ents[e].split(":")[1] for e in spans[spans[:, 3] == 1, 2])
        assert load_manifest(out)["config"]["stated_objects_first"] is flag
    share = {flag: 1 - k["person"] / sum(k.values()) for flag, k in kinds.items()}
    assert share[True] > share[False]  # the default prefers long-tail entities: the people (subjects)


def test_tiny_dataset_contents(tiny_dir):
    m = load_manifest(tiny_dir)
    tok = load_tokenizer()
    assert m["tokenizer"]["vocab_sha256"] == tokenizer_identity(tok)["vocab_sha256"]
    s = m["summary"]
    assert s["documents"] == 80 and s["injection_targets"] > 0 and 0 < s["long_tail_share_of_mentions"] < 1
    assert set(s["probe_facts_per_relation"]["stated"]) == {"born_in", "citizen_of", "occupation", "speaks", "plays"}
    ents, rels = load_entities(tiny_dir), load_relations(tiny_dir)
    kg = set(read_kg(tiny_dir / "kg.tsv"))
    budget = m["config"]["targets_per_sequence"]
    for split in ("train", "valid"):
        spans = np.load(tiny_dir / f"{split}_spans.npy")
        off = np.load(tiny_dir / f"{split}_span_offsets.npy")
        tokens = np.load(tiny_dir / f"{split}_tokens.npy")
        lengths = np.load(tiny_dir / f"{split}_lengths.npy")
        assert tokens.shape[1] == 128 and off[-1] == len(spans)
        assert (tokens[:, 0] == tok.cls_token_id).all()
        assert (tokens[np.arange(len(tokens)), lengths - 1] == tok.sep_token_id).all()
        for i in range(len(tokens)):
            rows = spans[off[i]:off[i + 1]]
            tgt = rows[rows[:, 3] == 1]
            assert len(tgt) <= budget
            assert ((rows[:, 0] >= 1) & (rows[:, 1] <= lengths[i] - 1)).all()
            for st, en, e, _, h, r in tgt:  # every target has a KG triple (h, r, target)
                assert (ents[h], rels[r], ents[e]) in kg
            for a in range(len(tgt)):
                for b in range(a):
                    assert tgt[a, 1] <= tgt[b, 0] or tgt[b, 1] <= tgt[a, 0]
            assert (rows[rows[:, 3] == 0, 4:] == -1).all()
    # probe objects are single tokens; probe templates never appear in the corpus; held-out facts never stated
    corpus = [json.loads(line)["text"] for line in open(tiny_dir / "corpus.jsonl")]
    sentences = [s for t in corpus for s in re.split(r"(?<=\.) ", t)]
    for name in ("probes.jsonl", "probes_heldout.jsonl"):
        for line in open(tiny_dir / name):
            p = json.loads(line)
            assert len(tok(p["object"], add_special_tokens=False)["input_ids"]) == 1
            assert p["template"].replace("[X]", p["subject"]).replace("[Y]", p["object"]) not in sentences
            stated = any(p["subject"] in s and p["object"] in s for s in sentences)
            assert stated == (name == "probes.jsonl")
    tok_arr, tok_off = np.load(tiny_dir / "entity_tokens.npy"), np.load(tiny_dir / "entity_token_offsets.npy")
    paris = ents.index("syn:city:paris")
    assert tok.decode(tok_arr[tok_off[paris]:tok_off[paris + 1]]) == "paris"


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    raw = _small_raw([("Bob met Ann.", [(0, 3, "e:a"), (8, 11, "e:b")])])
    out = tmp_path / "ds"

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(build_mod, "train_transe", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_dataset(raw, out, BuildConfig(**FAST), progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    build_dataset(raw, out, BuildConfig(**FAST), progress=False)
    before = load_manifest(out)["files"]
    monkeypatch.setattr(build_mod, "train_transe", boom)
    with pytest.raises(RuntimeError):  # a failed --force rebuild keeps the old dataset intact
        build_dataset(raw, out, BuildConfig(**FAST), progress=False, force=True)
    assert load_manifest(out)["files"] == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(FileExistsError, match="--force"):
        build_dataset(raw, out, BuildConfig(**FAST), progress=False)


@pytest.mark.parametrize("doc,field,reason", [
    (("Bob met Zed.", [(0, 3, "e:a"), (8, 11, "e:zed")]), "entities[1].id", "unknown entity id"),
    (("Bobby met Ann.", [(0, 3, "e:a"), (10, 13, "e:b")]), "entities[0]", "mention not alignable"),
])
def test_build_bad_mentions(tmp_path, doc, field, reason):
    raw = _small_raw([("Ann met Bob.", [(0, 3, "e:b"), (8, 11, "e:a")]), doc])
    with pytest.raises(DataFormatError) as e:
        build_dataset(raw, tmp_path / "x", BuildConfig(**FAST), progress=False)
    assert (e.value.file, e.value.line, e.value.field) == ("corpus.jsonl", 2, field)
    assert not (tmp_path / "x").exists()
    s = build_dataset(raw, tmp_path / "y", BuildConfig(**FAST), BadRecords("skip"), progress=False)
    assert s["bad_records"]["skipped"] == 1 and any(reason in k for k in s["bad_records"]["by_reason"])
    assert s["mentions"] == 3
    written = [json.loads(line) for line in open(tmp_path / "y" / "corpus.jsonl")]
    assert sum(len(d["entities"]) for d in written) == 3  # the skipped mention is not written back


def test_probe_object_must_be_one_token(tmp_path):
    probes = [Probe("r", "[X] likes [Y].", "Bob", "Ann", "p.jsonl", 1),
              Probe("r", "[X] likes [Y].", "Bob", "Zorvankeltish", "p.jsonl", 2)]
    raw = _small_raw([("Bob met Ann.", [(0, 3, "e:a"), (8, 11, "e:b")])], probes=probes)
    with pytest.raises(DataFormatError, match=r"p.jsonl:2: field 'object': 'Zorvankeltish' is \d+ tokens"):
        build_dataset(raw, tmp_path / "x", BuildConfig(**FAST), progress=False)
    s = build_dataset(raw, tmp_path / "y", BuildConfig(**FAST), BadRecords("skip"), progress=False)
    assert s["probe_facts_per_relation"]["stated"] == {"r": 1}


@pytest.mark.slow
def test_cli_files_source_round_trip(tiny_dir, tmp_path, capsys):
    out = tmp_path / "files_ds"
    args = ["build", "--source", "files", "--corpus", str(tiny_dir / "corpus.jsonl"), "--kg", str(tiny_dir / "kg.tsv"),
            "--probes", str(tiny_dir / "probes.jsonl"), "--out", str(out), "--quiet", "--transe-epochs", "10",
            "--transe-dim", "16"]
    assert cli(args) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["documents"] == 80
    assert np.array_equal(np.load(out / "train_tokens.npy"), np.load(tiny_dir / "train_tokens.npy"))

    def named(d):
        ents = load_entities(d)
        return [(s, e, ents[i], t) for s, e, i, t, *_ in np.load(d / "train_spans.npy").tolist()]

    assert named(out) == named(tiny_dir)
    # bad input through the CLI: error names file, line and field; exit code 2
    bad = tmp_path / "bad.jsonl"
    write_corpus(bad, [Document("Bob met Ann.", [Mention(0, 3, "syn:person:0")])])
    with open(bad, "a") as f:
        f.write('{"text": "x", "entities": [{"start": 0, "end": 1}]}\n')
    assert cli(["build", "--source", "files", "--corpus", str(bad), "--kg", str(tiny_dir / "kg.tsv"),
                "--out", str(tmp_path / "z"), "--quiet"]) == 2
    assert f"{bad}:2: field 'entities[0].id': missing" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_manifest_checksums(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(tiny_dir, d)
    load_manifest(d)
    arr = np.load(d / "train_tokens.npy")
    arr[0, 1] += 1
    np.save(d / "train_tokens.npy", arr)
    with pytest.raises(DataFormatError, match=r"train_tokens.npy: checksum mismatch"):
        load_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished dataset"):
        load_manifest(d)


def test_litter_of_killed_builds(tiny_dir, tmp_path):
    """What kill -9 leaves: the loader names a previous dataset parked by a --force rebuild, and the
    next build removes dead processes' leftovers only (a live pid's and a needed .old- stay)."""
    import shutil
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "ds"
    (tmp_path / f"ds.tmp-{dead.pid}").mkdir()
    (tmp_path / "ds.tmp-1").mkdir()  # pid 1 is alive: a build in progress
    shutil.copytree(tiny_dir, tmp_path / f"ds.old-{dead.pid}")
    with pytest.raises(FileNotFoundError, match=rf"ds.old-{dead.pid} holds the dataset .* rename it to ds"):
        load_manifest(out)
    assert build_mod.remove_stale_build_dirs(out) == [tmp_path / f"ds.tmp-{dead.pid}"]
    shutil.copytree(tiny_dir, out)  # a finished dataset again: the parked one is no longer needed
    assert build_mod.remove_stale_build_dirs(out) == [tmp_path / f"ds.old-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.tmp-1"]


@pytest.mark.slow
def test_sigterm_leaves_no_dataset(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-m", "trelm_fast.data", "build", "--source", "synthetic", "--size",
                             "small", "--out", str(out), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not list(tmp_path.glob("ds.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob("ds.tmp-*")), "the build never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_a_build_whose_skips_leave_no_entities_or_mentions_fails(tiny_dir, tmp_path, capsys):
    kg = tmp_path / "kg.tsv"
    kg.write_text("a\tb\nc\n")  # every line malformed: skipped
    args = ["build", "--source", "files", "--corpus", str(tiny_dir / "corpus.jsonl"), "--kg", str(kg),
            "--on-bad-record", "skip", "--out", str(tmp_path / "none"), "--quiet"]
    assert cli(args) == 2
    assert f"no entities to build from: {kg} has no triples left (source 'files'; 2 bad records skipped)" in \
        capsys.readouterr().err
    raw = _small_raw([("Ann met Bob.", [(0, 3, "e:ann")])])  # the only mention names no KG entity
    with pytest.raises(ValueError, match="no entity mentions to build from: none of the 1 documents"):
        build_dataset(raw, tmp_path / "nomentions", BuildConfig(**FAST), BadRecords("skip"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kg.tsv"]


def test_lone_surrogate_in_the_corpus_is_a_bad_record_through_the_cli(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text((tiny_dir / "corpus.jsonl").read_text().splitlines()[0] + "\n"
                      + '{"text": "\\ud800", "entities": []}\n')
    assert cli(["build", "--source", "files", "--corpus", str(corpus), "--kg", str(tiny_dir / "kg.tsv"),
                "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{corpus}:2: field 'text': lone surrogate \\ud800" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_manifest_names_are_confined_to_the_dataset_directory(tiny_dir, tmp_path):
    import shutil

    from trelm_fast.data.checksums import file_checksums

    d = tmp_path / "ds"
    shutil.copytree(tiny_dir, d)
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the dataset")
    for name in ("../outside.txt", str(outside)):
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["files"][name] = file_checksums(tmp_path, ["outside.txt"])["outside.txt"]  # checksum matches
        (d / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DataFormatError, match=rf"manifest.json: field 'files': '{re.escape(name)}' is not a file "
                                                  "name inside"):
            load_manifest(d)
        del manifest["files"][name]
        (d / "manifest.json").write_text(json.dumps(manifest))
    load_manifest(d)


def test_a_parked_dataset_blocks_a_build_instead_of_being_removed(tiny_dir, tmp_path):
    import shutil
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parked = tmp_path / f"ds.old-{dead.pid}"  # a --force rebuild killed between its two renames
    shutil.copytree(tiny_dir, parked)
    filled = []
    with pytest.raises(FileExistsError, match=rf"{parked} holds the dataset .* rename it to ds"):
        build_mod.write_atomically(tmp_path / "ds", filled.append)
    assert filled == [] and (parked / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [parked.name]
