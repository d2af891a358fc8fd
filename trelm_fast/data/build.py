"""The build pipeline: a source's raw data -> a dataset directory (see docs/data.md).

Steps: validate entity ids -> tokenize and align mentions -> pack into sequences of ``seq_len``
tokens -> entity frequencies and long-tail flags -> SI per mention (batched base-encoder
forwards) -> injection targets (high SI, long-tail preferred, a per-sequence budget, each with a
KG triple (h, r, target)) -> TransE -> write arrays, id lists, probes and, last, the manifest.
Everything is written to ``OUT.tmp-<pid>`` and renamed to ``OUT`` only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .align import Sequence, align_documents, pack_document
from .base_model import load_encoder, load_tokenizer, tokenizer_identity
from .checksums import file_checksums
from .formats import (BadRecords, DataFormatError, Document, Probe, write_corpus, write_id_list,
                      write_kg, write_kg_embeddings, write_probes)
from .importance import score_sequences, sentence_contexts
from .sources import RawData
from .transe import train_transe

FORMAT_VERSION = 1
SPAN_COLUMNS = ("start", "end", "entity_id", "is_target", "head_entity_id", "relation_id")
SPLITS = ("train", "valid")


@dataclass
class BuildConfig:
    """Build options (stored in the manifest).

    long_tail_quantile: an entity is long-tail when its mention count is at most this quantile of
    the mention counts of the entities that occur. si_min_quantile: a mention is a target
    candidate only when its SI is at least this quantile of all candidates' SI ("high SI").
    targets_per_sequence: the injection budget of one sequence. long_tail_only: never pick a
    frequent entity (otherwise long-tail ones are only preferred). stated_objects_first: take first
    the mentions that are the object (tail) of a KG triple whose subject (head) is mentioned in the
    same sequence, i.e. the objects of the facts a sequence states, which the probes ask for
    (otherwise long-tail first: the synthetic set's long-tail entities are its people, the probes'
    subjects).
    """

    source: str = "synthetic"
    size: str = "tiny"
    seed: int = 0
    seq_len: int = 128
    on_bad_record: str = "error"
    long_tail_quantile: float = 0.5
    si_min_quantile: float = 0.5
    targets_per_sequence: int = 2
    long_tail_only: bool = False
    stated_objects_first: bool = False
    valid_fraction: float = 0.05
    transe_dim: int = 64
    transe_epochs: int = 100
    si_max_rows: int = 96
    max_pages: int | None = None
    inputs: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("long_tail_quantile", "si_min_quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be at least 8, got {self.seq_len}")
        if self.targets_per_sequence < 0:
            raise ValueError(f"targets_per_sequence must be >= 0, got {self.targets_per_sequence}")


def _check_entity_ids(docs: list[Document], known: set[str], bad: BadRecords, kg_name: str) -> list[Document]:
    """Drop (or raise on) mentions of ids unknown to the KG / source."""
    out = []
    for d in docs:
        keep = []
        for k, m in enumerate(d.entities):
            if m.id in known:
                keep.append(m)
            else:
                bad.report(DataFormatError(d.file, d.line, f"entities[{k}].id",
                                           f"unknown entity id {m.id!r} (not in {kg_name})"), "corpus: unknown entity id")
        out.append(Document(d.text, keep, d.file, d.line))
    return out


def _check_probes(probes: list[Probe], tok, bad: BadRecords) -> list[Probe]:
    """Keep probes whose object is one token under ``tok`` (else a bad record)."""
    out = []
    for p in probes:
        n = len(tok(p.object, add_special_tokens=False)["input_ids"])
        if n == 1:
            out.append(p)
        else:
            bad.report(DataFormatError(p.file, p.line, "object", f"{p.object!r} is {n} tokens under the "
                                       "tokenizer; probe objects must be a single token"), "probes: object not one token")
    return out


def _long_tail(freq: np.ndarray, q: float) -> tuple[np.ndarray, float]:
    seen = freq[freq > 0]
    thr = float(np.quantile(seen, q)) if len(seen) else 0.0
    return (freq > 0) & (freq <= thr), thr


def select_targets(spans: np.ndarray, si: np.ndarray, long_tail: np.ndarray, has_triple: np.ndarray,
                   si_threshold: float, budget: int, long_tail_only: bool,
                   stated_object: np.ndarray | None = None) -> np.ndarray:
    """Targets of one sequence: bool [M] over ``spans`` int [M, 3] (start, end, entity).

    Candidates have a KG triple with the entity as tail and SI >= ``si_threshold``; they are taken
    (with ``stated_object``, bool [M], those flagged first) long-tail first, then by SI descending,
    skipping spans that overlap a chosen one, up to ``budget``.
    """
    chosen = np.zeros(len(spans), dtype=bool)
    ent = spans[:, 2]
    first = np.ones(len(spans), dtype=bool) if stated_object is None else stated_object
    cand = [i for i in range(len(spans)) if has_triple[ent[i]] and si[i] >= si_threshold
            and (long_tail[ent[i]] or not long_tail_only)]
    cand.sort(key=lambda i: (not first[i], not long_tail[ent[i]], -si[i], i))
    for i in cand:
        if chosen.sum() >= budget:
            break
        if not any(chosen[j] and spans[j, 0] < spans[i, 1] and spans[i, 0] < spans[j, 1] for j in range(len(spans))):
            chosen[i] = True
    return chosen


def _pick_triple(options: list[tuple[int, int]], in_sequence: set[int]) -> tuple[int, int]:
    """(head, relation) for a target: a triple whose head is in the same sequence if any, else the first."""
    for h, r in options:
        if h in in_sequence:
            return h, r
    return options[0]


def load_source(config: BuildConfig, bad: BadRecords, progress: bool = True) -> RawData:
    """The raw data of ``config.source``: synthetic (size, seed), wiki-geo (max_pages), files
    (``config.inputs``: corpus, kg and optionally probes, probes_heldout paths) or hf (``config.inputs``:
    path of a `datasets` dataset on disk, kg, optionally probes, probes_heldout, text_column,
    entities_column)."""
    if config.source == "synthetic":
        from .sources.synthetic import generate

        return generate(config.size, config.seed)
    if config.source == "wiki-geo":
        from .sources.wiki_geo import load_wiki_geo

        return load_wiki_geo(max_pages=config.max_pages, progress=progress)
    if config.source == "files":
        if "corpus" not in config.inputs or "kg" not in config.inputs:
            raise ValueError("source 'files' needs the corpus and kg paths (--corpus, --kg)")
        from .sources.files import load_files

        return load_files(config.inputs["corpus"], config.inputs["kg"], config.inputs.get("probes"),
                          config.inputs.get("probes_heldout"), bad)
    if config.source == "hf":
        if "path" not in config.inputs or "kg" not in config.inputs:
            raise ValueError("source 'hf' needs the dataset and kg paths (--path, --kg)")
        from .sources.hf import load_hf

        i = config.inputs
        return load_hf(i["path"], i["kg"], i.get("probes"), i.get("probes_heldout"), bad,
                       text_column=i.get("text_column", "text"), entities_column=i.get("entities_column", "entities"))
    raise ValueError(f"unknown source {config.source!r}: expected synthetic, wiki-geo, files or hf")


def build_source(out: str | Path, config: BuildConfig, progress: bool = True, force: bool = False) -> dict:
    """Load ``config.source`` and build it into ``out`` (see :func:`build_dataset`); returns the summary."""
    bad = BadRecords(config.on_bad_record)
    return build_dataset(load_source(config, bad, progress), out, config, bad, progress=progress, force=force)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


def remove_stale_build_dirs(out: Path) -> list[Path]:
    """Remove what killed builds of ``out`` left beside it; returns the removed paths.

    ``OUT.tmp-<pid>`` (a build killed before it finished: never a dataset) goes when process <pid>
    is gone. ``OUT.old-<pid>`` (a --force rebuild killed between its two renames: the previous,
    complete dataset) goes only when ``OUT`` is a finished dataset again; otherwise it is kept, and
    the loader's error names it.
    """
    removed = []
    for kind in ("tmp", "old"):
        for d in out.parent.glob(f"{out.name}.{kind}-*"):
            pid = d.name.rsplit("-", 1)[1]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not (out / "manifest.json").is_file():
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def build_dataset(raw: RawData, out: str | Path, config: BuildConfig, bad: BadRecords | None = None,
                  progress: bool = True, force: bool = False) -> dict:
    """Build the dataset of ``raw`` into ``out`` atomically; returns the summary (also in the manifest)."""
    config.validate()
    return write_atomically(out, lambda d: _build_into(raw, d, config, bad or BadRecords(config.on_bad_record),
                                                       progress), force)


def write_atomically(out: str | Path, fill: Callable[[Path], dict], force: bool = False) -> dict:
    """Run ``fill`` on the empty directory ``OUT.tmp-<pid>`` and rename it to ``out`` when it returns
    (replacing ``out`` only with ``force``); returns what ``fill`` returns."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force to replace it")
    parked = [d for d in sorted(out.parent.glob(f"{out.name}.old-*")) if not (out / "manifest.json").is_file()]
    if parked:
        raise FileExistsError(f"{parked[-1]} holds the dataset that a killed --force rebuild of {out} was "
                              f"replacing: rename it to {out.name} to use it, or remove it to build anew")
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    for d in remove_stale_build_dirs(out):
        print(f"removed {d}, left by a killed build", flush=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        summary = fill(tmp)
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _build_into(raw: RawData, d: Path, cfg: BuildConfig, bad: BadRecords, progress: bool) -> dict:
    t_start = time.perf_counter()
    tok = load_tokenizer()
    # --- ids -----------------------------------------------------------------------------------
    entity_ids = sorted({x for h, _, t in raw.triples for x in (h, t)} | set(raw.entity_names))
    relation_ids = sorted({r for _, r, _ in raw.triples})
    ent_row = {e: i for i, e in enumerate(entity_ids)}
    rel_row = {r: i for i, r in enumerate(relation_ids)}
    kg_name = cfg.inputs.get("kg", "the KG")
    if not entity_ids:
        raise ValueError(f"no entities to build from: {kg_name} has no triples left (source {cfg.source!r}; "
                         f"{bad.total} bad records skipped)")
    docs = _check_entity_ids(raw.documents, set(ent_row), bad, kg_name)
    if not docs:
        raise ValueError(f"no documents to build from (source {cfg.source!r}; {bad.total} bad records skipped)")

    # --- tokenize, align, pack ---------------------------------------------------------------
    aligned = align_documents(docs, tok)
    for doc, a in zip(docs, aligned):
        for u in a.unaligned:
            bad.report(DataFormatError(doc.file, doc.line, f"entities[{u.mention}]", f"cannot align to tokens: {u.reason}"),
                       "corpus: mention not alignable")
    breaks = frozenset(tok.convert_tokens_to_ids([".", "!", "?"]))
    seqs: list[Sequence] = []
    for i, a in enumerate(aligned):
        s, dropped = pack_document(i, a, cfg.seq_len, tok.cls_token_id, tok.sep_token_id, breaks)
        for sp in dropped:
            bad.report(DataFormatError(docs[i].file, docs[i].line, f"entities[{sp.mention}]",
                                       f"mention of {sp.end - sp.start} tokens does not fit a sequence of {cfg.seq_len}"),
                       "corpus: mention longer than a sequence")
        seqs += s
    span_arr = [np.array([(s.start, s.end, ent_row[docs[q.doc].entities[s.mention].id]) for s in q.spans],
                         dtype=np.int64).reshape(-1, 3) for q in seqs]
    if not any(len(a) for a in span_arr):
        raise ValueError(f"no entity mentions to build from: none of the {len(docs)} documents has a mention of "
                         f"an entity of {kg_name} left (source {cfg.source!r}; {bad.total} bad records skipped)")

    # --- frequencies, long tail ----------------------------------------------------------------
    freq = np.bincount(np.concatenate([a[:, 2] for a in span_arr]) if span_arr else np.zeros(0, np.int64),
                       minlength=len(entity_ids)).astype(np.int64)
    long_tail, lt_threshold = _long_tail(freq, cfg.long_tail_quantile)

    # --- SI ------------------------------------------------------------------------------------
    si, si_stats = _score_mentions(seqs, span_arr, breaks, tok, cfg, progress)

    # --- targets -------------------------------------------------------------------------------
    heads_of: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for h, r, t in sorted(raw.triples, key=lambda x: (rel_row[x[1]], ent_row[x[0]], ent_row[x[2]])):
        heads_of[ent_row[t]].append((ent_row[h], rel_row[r]))
    has_triple = np.zeros(len(entity_ids), dtype=bool)
    has_triple[list(heads_of)] = True
    cand_si = np.concatenate([s[has_triple[a[:, 2]]] for s, a in zip(si, span_arr)]) if seqs else np.zeros(0)
    si_threshold = float(np.quantile(cand_si, cfg.si_min_quantile)) if len(cand_si) else 0.0
    rows_per_seq = []
    for a, s in zip(span_arr, si):
        present = set(a[:, 2].tolist())
        stated = (np.array([any(h in present and h != e for h, _ in heads_of[e]) for e in a[:, 2].tolist()], dtype=bool)
                  if cfg.stated_objects_first else None)
        is_t = select_targets(a, s, long_tail, has_triple, si_threshold, cfg.targets_per_sequence, cfg.long_tail_only,
                              stated)
        rows = np.full((len(a), 6), -1, dtype=np.int64)
        rows[:, :3] = a
        rows[:, 3] = is_t
        for i in np.flatnonzero(is_t):
            rows[i, 4:] = _pick_triple(heads_of[int(a[i, 2])], present - {int(a[i, 2])})
        rows_per_seq.append(rows)

    # --- split by document ---------------------------------------------------------------------
    rng = np.random.default_rng([cfg.seed, 1])
    is_valid_doc = rng.random(len(docs)) < cfg.valid_fraction
    if cfg.valid_fraction > 0 and len(docs) > 1 and not is_valid_doc.any():
        is_valid_doc[rng.integers(len(docs))] = True
    split_of = ["valid" if is_valid_doc[q.doc] else "train" for q in seqs]

    # --- write ---------------------------------------------------------------------------------
    kept = defaultdict(set)  # the mentions that made it into a sequence, per document
    for q in seqs:
        kept[q.doc].update(sp.mention for sp in q.spans)
    write_corpus(d / "corpus.jsonl", (Document(doc.text, [m for k, m in enumerate(doc.entities) if k in kept[i]])
                                      for i, doc in enumerate(docs)))
    write_id_list(d / "entities.txt", entity_ids)
    write_id_list(d / "relations.txt", relation_ids)
    write_kg(d / "kg.tsv", raw.triples)
    triples_t = torch.tensor([(ent_row[h], rel_row[r], ent_row[t]) for h, r, t in raw.triples],
                             dtype=torch.long).reshape(-1, 3)
    E, R, transe_stats = train_transe(triples_t, len(entity_ids), len(relation_ids), cfg.transe_dim,
                                      cfg.transe_epochs, seed=cfg.seed, progress=progress)
    write_kg_embeddings(d / "kg_embeddings.safetensors", E, R)
    names = _entity_names(raw, docs, entity_ids)
    write_entity_tokens(d, tok(names, add_special_tokens=False)["input_ids"] if names else [])
    np.save(d / "entity_freq.npy", freq)
    np.save(d / "entity_long_tail.npy", long_tail)
    split_counts = {}
    for split in SPLITS:
        idx = [i for i, s in enumerate(split_of) if s == split]
        split_counts[split] = write_split(d, split, [seqs[i].input_ids for i in idx], [rows_per_seq[i] for i in idx],
                                           [si[i] for i in idx], cfg.seq_len, tok.pad_token_id)
    probes = _check_probes(raw.probes, tok, bad)
    probes_heldout = _check_probes(raw.probes_heldout, tok, bad)
    write_probes(d / "probes.jsonl", probes)
    write_probes(d / "probes_heldout.jsonl", probes_heldout)

    # --- summary + manifest (last) -------------------------------------------------------------
    all_rows = np.concatenate(rows_per_seq) if rows_per_seq else np.zeros((0, 6), np.int64)
    n_mentions = len(all_rows)
    summary = {
        "documents": len(docs),
        "sequences": len(seqs),
        "mentions": n_mentions,
        "distinct_entities": int((freq > 0).sum()),
        "entities": len(entity_ids),
        "relations": len(relation_ids),
        "kg_triples": len(raw.triples),
        "long_tail_threshold": lt_threshold,
        "long_tail_share_of_entities": round(float(long_tail.sum() / max((freq > 0).sum(), 1)), 4),
        "long_tail_share_of_mentions": round(float(long_tail[all_rows[:, 2]].mean()) if n_mentions else 0.0, 4),
        "injection_targets": int(all_rows[:, 3].sum()),
        "injection_targets_long_tail": int(long_tail[all_rows[all_rows[:, 3] == 1, 2]].sum()),
        "si_threshold": round(si_threshold, 6),
        "si_scoring": si_stats,
        "probe_facts_per_relation": {"stated": dict(sorted(Counter(p.relation for p in probes).items())),
                                     "heldout": dict(sorted(Counter(p.relation for p in probes_heldout).items()))},
        "splits": split_counts,
        "transe": transe_stats,
        "bad_records": bad.summary(),
        "source_stats": raw.stats,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    write_manifest(d, cfg.source, asdict(cfg), cfg.seq_len, tok, summary)
    return summary


def write_manifest(d: Path, source: str, config: dict, seq_len: int, tok, summary: dict) -> None:
    """Write ``manifest.json`` (last): format, build config, tokenizer identity and special ids, counts
    (from ``summary``), the summary, and the size and sha256 of every file in ``d``."""
    files = file_checksums(d)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "config": config,
        "seq_len": seq_len,
        "span_columns": list(SPAN_COLUMNS),
        "splits": list(SPLITS),
        "tokenizer": {**tokenizer_identity(tok), "cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id,
                      "pad_id": tok.pad_token_id, "mask_id": tok.mask_token_id},
        "counts": {k: summary[k] for k in ("documents", "sequences", "mentions", "distinct_entities", "entities",
                                             "relations", "kg_triples", "injection_targets")},
        "summary": summary,
        "files": files,
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _score_mentions(seqs: list[Sequence], span_arr: list[np.ndarray], breaks: frozenset[int], tok,
                    cfg: BuildConfig, progress: bool) -> tuple[list[np.ndarray], dict]:
    """SI of every mention, each scored in its sentence; per-sequence float32 [M_i] arrays."""
    ctx_ids, ctx_spans, where = [], [], []
    for q, (seq, a) in enumerate(zip(seqs, span_arr)):
        if len(a):
            for ids, sp, idx in sentence_contexts(seq.input_ids, a[:, :2], breaks):
                ctx_ids.append(ids)
                ctx_spans.append(sp)
                where.append((q, idx))
    scores, stats = score_sequences(load_encoder(), ctx_ids, ctx_spans, tok.mask_token_id, tok.pad_token_id,
                                    cfg.si_max_rows, progress)
    si = [np.zeros(len(a), np.float32) for a in span_arr]
    for (q, idx), sc in zip(where, scores):
        si[q][idx] = sc
    return si, {**stats, "contexts": len(ctx_ids)}


def _entity_names(raw: RawData, docs: list[Document], entity_ids: list[str]) -> list[str]:
    surface: dict[str, Counter] = defaultdict(Counter)
    for doc in docs:
        for m in doc.entities:
            surface[m.id][doc.text[m.start:m.end].strip()] += 1
    return [raw.entity_names.get(e) or (surface[e].most_common(1)[0][0] if surface[e] else e) for e in entity_ids]


def write_entity_tokens(d: Path, token_lists: list[list[int]]) -> None:
    """``entity_tokens.npy`` int32 [total] and ``entity_token_offsets.npy`` int64 [N_ent + 1]: the name
    tokens of entity i are ``token_lists[i]``."""
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in token_lists])
    np.save(d / "entity_tokens.npy", np.array([t for x in token_lists for t in x], dtype=np.int32))
    np.save(d / "entity_token_offsets.npy", offsets)


def write_split(d: Path, split: str, token_lists: list[list[int]], rows: list[np.ndarray], si: list[np.ndarray],
                 seq_len: int, pad_id: int) -> dict:
    """``{split}_tokens.npy`` int32 [S, n], ``{split}_lengths.npy`` int32 [S], ``{split}_spans.npy`` int64
    [M, 6], ``{split}_span_offsets.npy`` int64 [S+1], ``{split}_si.npy`` float32 [M]."""
    tokens = np.full((len(token_lists), seq_len), pad_id, dtype=np.int32)
    for i, t in enumerate(token_lists):
        tokens[i, : len(t)] = t
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    spans = np.concatenate(rows) if rows else np.zeros((0, 6), np.int64)
    np.save(d / f"{split}_tokens.npy", tokens)
    np.save(d / f"{split}_lengths.npy", np.array([len(t) for t in token_lists], dtype=np.int32))
    np.save(d / f"{split}_spans.npy", spans.reshape(-1, 6))
    np.save(d / f"{split}_span_offsets.npy", offsets)
    np.save(d / f"{split}_si.npy", np.concatenate(si).astype(np.float32) if si else np.zeros(0, np.float32))
    return {"sequences": len(token_lists), "mentions": int(len(spans)), "targets": int(spans[:, 3].sum()) if len(spans) else 0}
