"""Formats: round trips and bad input (errors name file, line and field; skip mode counts)."""
import json

import pytest
import torch

from trelm_fast.data.formats import (BadRecords, DataFormatError, Document, Mention, Probe, read_corpus, read_id_list,
                                     read_kg, read_kg_embeddings, read_probes, write_corpus, write_id_list, write_kg,
                                     write_kg_embeddings, write_probes)


def test_round_trips(tmp_path):
    docs = [Document("Ada Lovelace was born in London.", [Mention(0, 12, "e:ada"), Mention(25, 31, "e:london")]),
            Document("Ünïcode — text ✓", [])]
    assert write_corpus(tmp_path / "c.jsonl", docs) == 2
    back = list(read_corpus(tmp_path / "c.jsonl"))
    assert [(d.text, d.entities) for d in back] == [(d.text, d.entities) for d in docs]
    assert [d.line for d in back] == [1, 2]

    triples = [("e:ada", "born_in", "e:london"), ("e:london", "capital_of", "e:uk")]
    write_kg(tmp_path / "kg.tsv", triples)
    assert read_kg(tmp_path / "kg.tsv") == triples

    probes = [Probe("born_in", "[X] was born in the city of [Y].", "Ada Lovelace", "London")]
    write_probes(tmp_path / "p.jsonl", probes)
    assert read_probes(tmp_path / "p.jsonl") == probes
    assert probes[0].cloze("[MASK]") == "Ada Lovelace was born in the city of [MASK]."

    write_id_list(tmp_path / "ids.txt", ["a", "b c", "d"])
    assert read_id_list(tmp_path / "ids.txt") == ["a", "b c", "d"]

    E, R = torch.randn(5, 7), torch.randn(3, 7)
    write_kg_embeddings(tmp_path / "emb.safetensors", E, R)
    E2, R2 = read_kg_embeddings(tmp_path / "emb.safetensors", 5, 3)
    assert torch.equal(E, E2) and torch.equal(R, R2)
    with pytest.raises(DataFormatError, match="entity.*4 rows|has 5 rows, id list has 4"):
        read_kg_embeddings(tmp_path / "emb.safetensors", 4, 3)


GOOD = {"text": "Paris is big.", "entities": [{"start": 0, "end": 5, "id": "e:paris"}]}
BAD_CORPUS = [  # (line content, expected field in the message, reason key)
    ('{"text": "Paris is big.", "entities": [', None, "malformed JSON"),
    (json.dumps({"entities": []}), "text", "text invalid"),
    (json.dumps({"text": "Paris"}), "entities", "entities invalid"),
    (json.dumps({"text": "   ", "entities": []}), "text", "text invalid"),
    (json.dumps({"text": "Paris", "entities": [{"start": 0, "end": 9, "id": "x"}]}), "entities[0].start", "start invalid"),
    (json.dumps({"text": "Paris", "entities": [{"start": -1, "end": 2, "id": "x"}]}), "entities[0].start", "start invalid"),
    (json.dumps({"text": "Paris", "entities": [{"start": 0, "id": "x"}]}), "entities[0].end", "end invalid"),
    (json.dumps({"text": "Paris", "entities": [{"start": 0, "end": 5, "id": 3}]}), "entities[0].id", "id invalid"),
    (json.dumps({"text": "Paris", "entities": [{"start": True, "end": 5, "id": "x"}]}), "entities[0].start", "start invalid"),
    ("[1, 2]", None, "not an object"),
]


@pytest.mark.parametrize("line,field,reason", BAD_CORPUS)
def test_bad_corpus_record(tmp_path, line, field, reason):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataFormatError) as e:
        list(read_corpus(path))
    assert e.value.file == str(path) and e.value.line == 3 and e.value.field == field
    assert f"{path}:3" in str(e.value) and (field is None or f"'{field}'" in str(e.value))
    bad = BadRecords("skip")
    docs = list(read_corpus(path, bad))
    assert [d.line for d in docs] == [1, 4]
    assert bad.total == 1 and any(reason in k for k in bad.counts)


def test_bad_kg_lines(tmp_path):
    path = tmp_path / "kg.tsv"
    path.write_text("a\tr\tb\na\tr\nc\tr\td\textra\n\t r\tb\nc\tr\td\n")
    with pytest.raises(DataFormatError, match=r"kg.tsv:2: .*3 tab-separated columns.*got 2"):
        read_kg(path)
    bad = BadRecords("skip")
    assert read_kg(path, bad) == [("a", "r", "b"), ("c", "r", "d")]
    assert bad.counts == {"kg: wrong column count": 2, "kg: empty column": 1}


def test_bad_probe_records(tmp_path):
    path = tmp_path / "p.jsonl"
    good = {"relation": "r", "template": "[X] is in [Y].", "subject": "a", "object": "b"}
    path.write_text("\n".join([json.dumps(good), json.dumps({**good, "template": "[X] is in."}),
                               json.dumps({k: v for k, v in good.items() if k != "object"}), "{oops"]) + "\n")
    with pytest.raises(DataFormatError) as e:
        read_probes(path)
    assert (e.value.line, e.value.field) == (2, "template")
    bad = BadRecords("skip")
    assert len(read_probes(path, bad)) == 1 and bad.total == 3
    assert "p.jsonl:3: field 'object': missing" in " ".join(bad.examples)


def test_id_list_errors(tmp_path):
    (tmp_path / "ids.txt").write_text("a\nb\na\n")
    with pytest.raises(DataFormatError, match=r"ids.txt:3: field 'id': duplicate id 'a' \(first on line 1\)"):
        read_id_list(tmp_path / "ids.txt")
    with pytest.raises(ValueError):
        BadRecords("ignore")


def test_bytes_that_are_not_utf8_are_bad_records_with_file_and_line(tmp_path):
    corpus, kg = tmp_path / "corpus.jsonl", tmp_path / "kg.tsv"
    good = json.dumps(GOOD).encode()
    corpus.write_bytes(good + b"\n" + b'{"text": "Par\xffis", "entities": []}\n' + good + b"\r\n")
    kg.write_bytes(b"a\tr\tb\nc\tr\t\xfed\nc\tr\td\r\n")
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:2: not UTF-8: byte 0xff at byte 14 of the line"):
        list(read_corpus(corpus))
    with pytest.raises(DataFormatError, match=r"kg.tsv:2: not UTF-8: byte 0xfe"):
        read_kg(kg)
    bad = BadRecords("skip")
    assert [d.line for d in read_corpus(corpus, bad)] == [1, 3]
    assert read_kg(kg, bad) == [("a", "r", "b"), ("c", "r", "d")]
    assert bad.counts == {"corpus: not UTF-8": 1, "kg: not UTF-8": 1}


def test_lone_surrogates_are_bad_records_with_file_and_line(tmp_path):
    corpus, probes = tmp_path / "corpus.jsonl", tmp_path / "p.jsonl"
    corpus.write_text(json.dumps(GOOD) + "\n" + '{"text": "Pa\\ud800ris is big.", "entities": []}\n'
                      + '{"text": "Paris.", "entities": [{"start": 0, "end": 5, "id": "e:\\udfff"}]}\n')
    probes.write_text('{"relation": "r", "template": "[X] in [Y].", "subject": "\\ud83d", "object": "x"}\n')
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:2: field 'text': lone surrogate \\ud800 at character 2"):
        list(read_corpus(corpus))
    with pytest.raises(DataFormatError, match=r"p.jsonl:1: field 'subject': lone surrogate \\ud83d"):
        read_probes(probes)
    bad = BadRecords("skip")
    assert [d.line for d in read_corpus(corpus, bad)] == [1] and read_probes(probes, bad) == []
    assert bad.counts == {"corpus: lone surrogate": 2, "probes: lone surrogate": 1}
    assert "corpus.jsonl:3: field 'entities[0].id': lone surrogate \\udfff" in bad.examples[1]
