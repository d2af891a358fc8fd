"""Synthetic source: invented people with facts about real-word objects, stated by templates.

Deterministic from the seed. Entities: people with invented multi-token names, and objects that
are single-token English words under an uncased BERT vocabulary (cities, countries, occupations,
languages, instruments), so probes about them are answerable. Six relations: five person ->
object relations and ``mentor_of`` (person -> person). A fraction of the person -> object facts
is held out: they are in the KG but no corpus sentence states them (``probes_heldout``).

Mention frequency is a real long tail: each sentence is about a person drawn from a Zipf law over
a random ranking (and objects are drawn with a Zipf law over their pools). ``probes`` holds the
stated facts that the corpus actually rendered, with a template never used in the corpus.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..formats import Document, Mention, Probe
from . import RawData

SIZES = {  # persons, documents
    "tiny": (30, 80),
    "small": (600, 4000),
    "medium": (3000, 30000),
}

OBJECTS = {
    "city": "paris london berlin tokyo madrid rome cairo lima oslo vienna dublin athens moscow delhi "
            "sydney toronto chicago boston denver seattle".split(),
    "country": "france germany japan spain italy egypt peru norway austria ireland greece russia india "
               "china brazil mexico canada kenya chile".split(),
    "occupation": "doctor lawyer teacher farmer painter pilot nurse engineer chef writer singer dancer "
                  "architect soldier judge".split(),
    "language": "french german spanish italian japanese russian arabic hindi portuguese dutch greek polish "
                "swedish".split(),
    "instrument": "piano violin guitar drums flute cello trumpet harp organ clarinet saxophone banjo".split(),
}

# relation: (object kind, corpus templates, probe template); [X] is the subject, [Y] the object.
RELATIONS = {
    "born_in": ("city", ["[X] was born in [Y].", "[X] grew up in [Y] before moving abroad.",
                         "The birthplace of [X] is [Y]."], "[X] was born in the city of [Y]."),
    "citizen_of": ("country", ["[X] is a citizen of [Y].", "[X] holds a passport from [Y]."],
                   "[X] has the nationality of [Y]."),
    "occupation": ("occupation", ["[X] works as a [Y].", "By profession, [X] is a [Y]."],
                   "[X] earns a living as a [Y]."),
    "speaks": ("language", ["[X] speaks [Y] fluently.", "[X] is a native speaker of [Y]."],
               "The mother tongue of [X] is [Y]."),
    "plays": ("instrument", ["[X] plays the [Y].", "[X] has practiced the [Y] since childhood."],
              "The instrument of [X] is the [Y]."),
    "mentor_of": ("person", ["[X] was the mentor of [Y].", "[Y] studied under [X]."], None),
}

_ONSETS = "b br d dr f g gr h k kl l m n p pr r s st t tr v z th".split()
_VOWELS = "a e i o u ae ai ou".split()
_CODAS = ["", "n", "r", "l", "s", "th", "x", "nd", "rk"]


def _zipf(rng: np.random.Generator, n: int, size: int, s: float) -> np.ndarray:
    """``size`` draws from a Zipf law over ranks 0..n-1 (p(k) proportional to (k+1)^-s)."""
    p = 1.0 / np.arange(1, n + 1) ** s
    return rng.choice(n, size=size, p=p / p.sum())


def _names(rng: np.random.Generator, n: int) -> list[str]:
    def word(syll: int) -> str:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syll)) + rng.choice(_CODAS)
        return w.capitalize()

    out: dict[str, None] = {}
    while len(out) < n:
        out[f"{word(int(rng.integers(2, 4)))} {word(int(rng.integers(2, 4)))}"] = None
    return list(out)


def _display(kind: str, word: str) -> str:
    return word if kind in ("occupation", "instrument") else word.capitalize()


def generate(size: str = "tiny", seed: int = 0, heldout_fraction: float = 0.2, zipf_s: float = 1.1) -> RawData:
    """Generate the synthetic dataset of the given size (see ``SIZES``)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    n_people, n_docs = SIZES[size]
    rng = np.random.default_rng(seed)
    names = _names(rng, n_people)
    person_ids = [f"syn:person:{i}" for i in range(n_people)]
    entity_names = dict(zip(person_ids, names))
    for kind, words in OBJECTS.items():
        entity_names.update({f"syn:{kind}:{w}": _display(kind, w) for w in words})

    facts: list[tuple[str, str, str]] = []  # (person id, relation, object id)
    heldout: set[tuple[str, str, str]] = set()
    pools = {k: [f"syn:{k}:{w}" for w in rng.permutation(v)] for k, v in OBJECTS.items()}
    for i, pid in enumerate(person_ids):
        mine = []
        for rel, (kind, _, _) in RELATIONS.items():
            if kind == "person":
                if i > 0 and rng.random() < 0.5:
                    facts.append((person_ids[int(rng.integers(0, i))], rel, pid))
                continue
            obj = pools[kind][int(_zipf(rng, len(pools[kind]), 1, 1.0)[0])]
            mine.append((pid, rel, obj))
        held = rng.random(len(mine)) < heldout_fraction
        held[int(rng.integers(len(mine)))] = False  # every person keeps a stated fact
        heldout.update(f for f, h in zip(mine, held) if h)
        facts += mine

    stated_by_subject: dict[str, list[tuple[str, str, str]]] = {}
    for f in facts:
        if f not in heldout:
            stated_by_subject.setdefault(f[0] if RELATIONS[f[1]][0] != "person" else f[2], []).append(f)
    rank = rng.permutation(n_people)  # rank[k]: the person at Zipf rank k
    n_sent = rng.integers(1, 4, size=n_docs)
    about = _zipf(rng, n_people, int(n_sent.sum()), zipf_s)
    docs, rendered, k = [], set(), 0
    for d in range(n_docs):
        text, mentions = "", []
        for _ in range(n_sent[d]):
            subj = person_ids[rank[about[k]]]
            k += 1
            fact = stated_by_subject[subj][int(rng.integers(len(stated_by_subject[subj])))]
            rendered.add(fact)
            h, rel, t = fact
            tpl = RELATIONS[rel][1][int(rng.integers(len(RELATIONS[rel][1])))]
            if text:
                text += " "
            for piece in _split_template(tpl):
                if piece in ("[X]", "[Y]"):
                    eid = h if piece == "[X]" else t
                    surface = entity_names[eid]
                    mentions.append(Mention(len(text), len(text) + len(surface), eid))
                    text += surface
                else:
                    text += piece
        docs.append(Document(text, mentions, "<synthetic>", d + 1))

    def probes(selected):
        return [Probe(r, RELATIONS[r][2], entity_names[h], entity_names[t], "<synthetic>", i + 1)
                for i, (h, r, t) in enumerate(sorted(selected)) if RELATIONS[r][2] is not None]

    return RawData(
        documents=docs,
        triples=facts,
        probes=probes(rendered),
        probes_heldout=probes(heldout),
        entity_names=entity_names,
        stats={"persons": n_people, "facts": len(facts), "facts_heldout": len(heldout),
               "facts_stated": len(rendered), "zipf_s": zipf_s},
    )


def corpus_phrased(probes: list[Probe], documents: list[Document]) -> list[tuple[Probe, int]]:
    """Each probe fact in the phrasing of the corpus (its relation's first corpus template) with the
    number of corpus sentences that state it (any of the relation's corpus templates, counted in
    ``documents``' text): what the text teaches about each stated fact, against which a model's
    P@1 in the probes' own phrasing can be read."""
    text = "\n".join(d.text for d in documents)
    out = []
    for p in probes:
        templates = RELATIONS[p.relation][1]
        n = sum(text.count(t.replace("[X]", p.subject).replace("[Y]", p.object)) for t in templates)
        out.append((replace(p, template=templates[0]), n))
    return out


def _split_template(tpl: str) -> list[str]:
    """``"[X] was born in [Y]."`` -> ``["[X]", " was born in ", "[Y]", "."]``."""
    out, rest = [], tpl
    while rest:
        i = min((rest.find(t) for t in ("[X]", "[Y]") if t in rest), default=-1)
        if i < 0:
            out.append(rest)
            break
        if i:
            out.append(rest[:i])
        out.append(rest[i:i + 3])
        rest = rest[i + 3:]
    return out
