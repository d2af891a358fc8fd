"""Readers, writers and validators for the dataset's on-disk formats.

Formats (docs/data.md has the full description):
- corpus: JSON Lines, one document per line:
  ``{"text": str, "entities": [{"start": int, "end": int, "id": str}]}`` (character offsets,
  end exclusive);
- knowledge graph: TSV ``head<TAB>relation<TAB>tail``, one triple per line;
- id lists: one string id per line; the row number is the int64 id used everywhere else;
- KG embeddings: safetensors with ``entity`` [N_ent, k] and ``relation`` [N_rel, k], rows in the
  order of the id lists;
- probes: JSON Lines ``{"relation": str, "template": "... [X] ... [Y] ...", "subject": str,
  "object": str}``.

Every reader reports bad records through a :class:`BadRecords` policy: in ``"error"`` mode it
raises :class:`DataFormatError` naming file, line and field; in ``"skip"`` mode it counts the
record (by reason) and the caller drops it.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

ON_BAD_RECORD = ("error", "skip")


class DataFormatError(ValueError):
    """A record that does not follow its format; the message names file, line and field."""

    def __init__(self, file: str, line: int | None, field: str | None, message: str):
        self.file, self.line, self.field, self.reason = str(file), line, field, message
        where = self.file if line is None else f"{self.file}:{line}"
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class BadRecords:
    """Policy for bad records: raise (``mode="error"``) or count and skip (``mode="skip"``).

    ``counts`` maps a short reason (e.g. ``"corpus: malformed JSON"``) to the number skipped;
    ``examples`` keeps the first few messages for the summary.
    """

    def __init__(self, mode: str = "error", max_examples: int = 5):
        if mode not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {mode!r}")
        self.mode = mode
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []
        self._max_examples = max_examples

    def report(self, err: DataFormatError, kind: str) -> None:
        """Raise ``err`` in error mode; otherwise count it under ``kind``."""
        if self.mode == "error":
            raise err
        self.counts[kind] += 1
        if len(self.examples) < self._max_examples:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {"skipped": self.total, "by_reason": dict(self.counts), "examples": list(self.examples)}


@dataclass(frozen=True)
class Mention:
    """A linked entity mention: characters ``text[start:end]`` refer to entity ``id``."""

    start: int
    end: int
    id: str


@dataclass
class Document:
    """A corpus document; ``file``/``line`` say where it came from (for error messages)."""

    text: str
    entities: list[Mention]
    file: str = "<memory>"
    line: int = 0


@dataclass(frozen=True)
class Probe:
    """A cloze probe: ``template`` with ``[X]`` (subject) and ``[Y]`` (object, to predict)."""

    relation: str
    template: str
    subject: str
    object: str
    file: str = field(default="<memory>", compare=False)
    line: int = field(default=0, compare=False)

    def cloze(self, mask_token: str) -> str:
        """The probe sentence with the subject filled in and the object replaced by ``mask_token``."""
        return self.template.replace("[X]", self.subject).replace("[Y]", mask_token)


@dataclass
class _Cursor:
    file: str
    line: int
    bad: BadRecords
    kind: str
    errors: list[DataFormatError] = field(default_factory=list)

    def fail(self, fld: str | None, message: str) -> None:
        self.errors.append(DataFormatError(self.file, self.line, fld, message))


def _require(cur: _Cursor, obj: dict, key: str, typ: type, prefix: str = "") -> object:
    name = f"{prefix}{key}"
    if key not in obj:
        cur.fail(name, "missing")
        return None
    val = obj[key]
    if typ is int and isinstance(val, bool) or not isinstance(val, typ):
        cur.fail(name, f"expected {typ.__name__}, got {type(val).__name__} {val!r:.40}")
        return None
    return val


def _text_lines(path: str | Path, bad: BadRecords, kind: str) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break) of each UTF-8 line of ``path``; a line that is not
    UTF-8 is a bad record (file, line and the offending byte named) of reason ``{kind}: not UTF-8``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                bad.report(DataFormatError(path, lineno, None, f"not UTF-8: byte 0x{raw[e.start]:02x} at byte "
                                           f"{e.start + 1} of the line"), f"{kind}: not UTF-8")


def _json_lines(path: Path, bad: BadRecords, kind: str) -> Iterator[tuple[_Cursor, dict]]:
    for lineno, raw in _text_lines(path, bad, kind):
        if not raw.strip():
            continue
        cur = _Cursor(str(path), lineno, bad, kind)
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            bad.report(DataFormatError(path, lineno, None, f"malformed JSON ({e.msg} at column {e.colno})"),
                       f"{kind}: malformed JSON")
            continue
        if not isinstance(obj, dict):
            bad.report(DataFormatError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}"),
                       f"{kind}: not an object")
            continue
        surrogate = _lone_surrogate(obj, "")
        if surrogate is not None:
            fld, at, char = surrogate
            bad.report(DataFormatError(path, lineno, fld or None, f"lone surrogate \\u{ord(char):04x} at character "
                                       f"{at} (valid JSON, but not Unicode text)"), f"{kind}: lone surrogate")
            continue
        yield cur, obj


def _lone_surrogate(obj: object, path: str) -> tuple[str, int, str] | None:
    """(field path, character offset, the character) of the first lone surrogate (U+D800-U+DFFF,
    which JSON's ``\\ud800`` escapes can produce but UTF-8 cannot encode) in a parsed JSON value."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, e.start, obj[e.start]
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        if isinstance(key, str) and (found := _lone_surrogate(key, path)) is not None:
            return found
        sub = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
        if (found := _lone_surrogate(value, sub.lstrip("."))) is not None:
            return found
    return None


def parse_document(cur: _Cursor, obj: dict) -> Document | None:
    """Validate one corpus record (types, non-empty text, spans inside the text)."""
    text = _require(cur, obj, "text", str)
    ents = _require(cur, obj, "entities", list)
    if text is not None and not text.strip():
        cur.fail("text", "empty text")
    mentions = []
    for i, ent in enumerate(ents or []):
        pre = f"entities[{i}]."
        if not isinstance(ent, dict):
            cur.fail(f"entities[{i}]", f"expected an object, got {type(ent).__name__}")
            continue
        start = _require(cur, ent, "start", int, pre)
        end = _require(cur, ent, "end", int, pre)
        eid = _require(cur, ent, "id", str, pre)
        if None in (start, end, eid) or text is None:
            continue
        if not 0 <= start < end <= len(text):
            cur.fail(f"{pre}start", f"span [{start}, {end}) out of range for a text of {len(text)} characters")
            continue
        if not eid:
            cur.fail(f"{pre}id", "empty entity id")
            continue
        mentions.append(Mention(start, end, eid))
    if cur.errors:
        err = cur.errors[0]
        cur.bad.report(err, f"{cur.kind}: {err.field.split('.')[-1] if err.field else 'record'} invalid")
        return None
    return Document(text, mentions, cur.file, cur.line)


def read_corpus(path: str | Path, bad: BadRecords | None = None) -> Iterator[Document]:
    """Yield the valid documents of a corpus JSONL file (see module docstring for the schema)."""
    bad = bad or BadRecords()
    for cur, obj in _json_lines(Path(path), bad, "corpus"):
        doc = parse_document(cur, obj)
        if doc is not None:
            yield doc


def write_corpus(path: str | Path, docs: Iterable[Document]) -> int:
    """Write documents as corpus JSONL; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            ents = [{"start": m.start, "end": m.end, "id": m.id} for m in d.entities]
            f.write(json.dumps({"text": d.text, "entities": ents}, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_kg(path: str | Path, bad: BadRecords | None = None) -> list[tuple[str, str, str]]:
    """Read ``head<TAB>relation<TAB>tail`` lines; blank lines are ignored, duplicates kept once."""
    bad = bad or BadRecords()
    triples: dict[tuple[str, str, str], None] = {}
    names = ("head", "relation", "tail")
    for lineno, line in _text_lines(path, bad, "kg"):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 3:
            bad.report(DataFormatError(path, lineno, None, f"expected 3 tab-separated columns "
                                       f"(head, relation, tail), got {len(cols)}"), "kg: wrong column count")
            continue
        empty = [n for n, c in zip(names, cols) if not c.strip()]
        if empty:
            bad.report(DataFormatError(path, lineno, empty[0], "empty"), "kg: empty column")
            continue
        triples[tuple(c.strip() for c in cols)] = None
    return list(triples)


def write_kg(path: str | Path, triples: Iterable[tuple[str, str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for h, r, t in triples:
            if any("\t" in x or "\n" in x for x in (h, r, t)):
                raise ValueError(f"KG ids may not contain tabs or newlines: {(h, r, t)!r}")
            f.write(f"{h}\t{r}\t{t}\n")


def read_probes(path: str | Path, bad: BadRecords | None = None) -> list[Probe]:
    """Read probe JSONL; the template must contain ``[X]`` and ``[Y]`` once each."""
    bad = bad or BadRecords()
    out = []
    for cur, obj in _json_lines(Path(path), bad, "probes"):
        vals = {k: _require(cur, obj, k, str) for k in ("relation", "template", "subject", "object")}
        tpl = vals["template"]
        if tpl is not None and (tpl.count("[X]") != 1 or tpl.count("[Y]") != 1):
            cur.fail("template", f"must contain [X] and [Y] exactly once: {tpl!r}")
        for k in ("relation", "subject", "object"):
            if vals[k] is not None and not vals[k].strip():
                cur.fail(k, "empty")
        if cur.errors:
            cur.bad.report(cur.errors[0], f"probes: {cur.errors[0].field} invalid")
            continue
        out.append(Probe(**vals, file=cur.file, line=cur.line))
    return out


def write_probes(path: str | Path, probes: Iterable[Probe]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in probes:
            f.write(json.dumps({"relation": p.relation, "template": p.template, "subject": p.subject,
                                "object": p.object}, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_id_list(path: str | Path) -> list[str]:
    """One id per line; row i is int64 id i. Duplicates and empty lines are errors."""
    ids, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            s = raw.rstrip("\n")
            if not s:
                raise DataFormatError(path, lineno, "id", "empty id")
            if s in seen:
                raise DataFormatError(path, lineno, "id", f"duplicate id {s!r} (first on line {seen[s]})")
            seen[s] = lineno
            ids.append(s)
    return ids


def write_id_list(path: str | Path, ids: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s in ids:
            if not s or "\n" in s:
                raise ValueError(f"ids must be non-empty single-line strings, got {s!r}")
            f.write(s + "\n")


def write_kg_embeddings(path: str | Path, entity: torch.Tensor, relation: torch.Tensor) -> None:
    """Save ``entity`` [N_ent, k] and ``relation`` [N_rel, k] (rows follow the id lists)."""
    from safetensors.torch import save_file

    if entity.dim() != 2 or relation.dim() != 2 or entity.shape[1] != relation.shape[1]:
        raise ValueError(f"expected entity [N_ent, k] and relation [N_rel, k], got "
                         f"{tuple(entity.shape)} and {tuple(relation.shape)}")
    save_file({"entity": entity.contiguous().float(), "relation": relation.contiguous().float()}, str(path))


def read_kg_embeddings(path: str | Path, n_entities: int | None = None,
                       n_relations: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load (entity [N_ent, k], relation [N_rel, k]); checks row counts against the id lists if given."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    for key in ("entity", "relation"):
        if key not in t:
            raise DataFormatError(path, None, key, "tensor missing")
    for key, n in (("entity", n_entities), ("relation", n_relations)):
        if n is not None and t[key].shape[0] != n:
            raise DataFormatError(path, None, key, f"has {t[key].shape[0]} rows, id list has {n}")
    return t["entity"], t["relation"]
