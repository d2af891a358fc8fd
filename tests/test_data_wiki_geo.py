"""wiki-geo source: markup stripping, link extraction, the GeoNames KG, and a bounded build."""
import json

import numpy as np
import pytest

from trelm_fast.data.build import BuildConfig, build_dataset
from trelm_fast.data.loader import load_entities, load_manifest
from trelm_fast.data.sources.wiki_geo import (TEMPLATES, clean_markup, extract_links, geonames_kg, iter_pages,
                                              load_wiki_geo, wiki_file)


def test_clean_markup():
    src = ("{{Infobox|name={{nested|x}}}}'''Lyon''' is a city<ref name=a>{{cite|y}}</ref> in [[France]].<!-- c -->\n"
           "== History ==\n{| class=t\n|-\n| cell {{t}}\n|}\n* See [http://x.org the site] &amp; more<br/>.")
    out = clean_markup(src)
    assert out.startswith("Lyon is a city in [[France]].")
    for gone in ("{{", "}}", "<ref", "cite", "History", "cell", "<!--", "http", "<br"):
        assert gone not in out
    assert "See the site & more." in out


def test_extract_links():
    text, links = extract_links("[[France|French]] towns, [[Paris]]ian life, [[File:x.png|thumb|a [[Lyon]] map]] "
                                "[[Category:Cities]][[de:Paris]] and [[Rhône (river)#Course|the Rhône]].")
    assert text == "French towns, Parisian life,   and the Rhône."
    assert [(text[a:b], t) for a, b, t in links] == [("French", "France"), ("Parisian", "Paris"),
                                                     ("the Rhône", "Rhône (river)")]


def test_geonames_kg():
    triples, names, index = geonames_kg(extra_city_names={"Lyon"})
    kg = set(triples)
    assert {r for _, r, _ in triples} == set(TEMPLATES)
    fr = index["France"]
    paris = next(t for h, r, t in triples if h == fr and r == "capital")
    assert names[paris] == "Paris" and (paris, "located_in_country", fr) in kg
    assert (fr, "continent", "geo:continent:EU") in kg and (fr, "currency", "geo:currency:EUR") in kg
    assert (fr, "official_language", "geo:language:fr") in kg and index["French language"] == "geo:language:fr"
    assert (fr, "shares_border_with", index["Germany"]) in kg
    assert names[index["Lyon"]] == "Lyon"


def test_pages_are_real_articles():
    pages = list(iter_pages(wiki_file(), max_pages=3))
    assert len(pages) == 3 and all(len(t) > 1000 for _, t in pages)
    assert pages[0][0] == "Anarchism"


@pytest.mark.slow
def test_wiki_geo_bounded_build(tmp_path):
    raw = load_wiki_geo(max_pages=2, progress=False)
    assert raw.documents and raw.probes_heldout
    for d in raw.documents:
        for m in d.entities:  # linked or propagated mentions are whole words
            assert d.text[m.start:m.end].strip() == d.text[m.start:m.end]
    s = build_dataset(raw, tmp_path / "wg", BuildConfig(source="wiki-geo", max_pages=2, transe_epochs=5,
                                                       transe_dim=16), progress=False)
    assert s["mentions"] == raw.stats["mentions_linked"] + raw.stats["mentions_propagated"]
    assert s["bad_records"]["skipped"] == 0 and s["injection_targets"] > 0
    m = load_manifest(tmp_path / "wg")
    ents = load_entities(tmp_path / "wg")
    spans = np.load(tmp_path / "wg" / "train_spans.npy")
    assert all(ents[e].startswith("geo:") for e in spans[:, 2])
    for line in open(tmp_path / "wg" / "probes_heldout.jsonl"):
        p = json.loads(line)
        assert p["template"] == TEMPLATES[p["relation"]]
    assert m["source"] == "wiki-geo"
