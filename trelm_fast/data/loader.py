"""Reading a built dataset: manifest checks, a torch Dataset over the memory-mapped arrays, the MLM
collator that yields the batch contract of docs/architecture.md, and a resumable sampler.

Determinism: the masking of sample i in epoch e depends only on (seed, e, i), and the sampler's
order only on (seed, e), so restarting at a given position reproduces the batches that follow.
The sampler yields ``(epoch, index)`` keys, which the dataset accepts, so the epoch reaches the
DataLoader's worker processes with each key.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from trelm_fast.config import MASKING, resolve_model_path, static_shapes_on

from .build import FORMAT_VERSION, SPAN_COLUMNS
from .checksums import verify_checksums
from .formats import DataFormatError, Probe, read_id_list, read_kg_embeddings, read_probes
from .prepare import prepare_batch

_ARRAYS = ("tokens", "lengths", "spans", "span_offsets", "si")


def load_manifest(directory: str | Path, verify: bool = True) -> dict:
    """Read ``manifest.json``; with ``verify``, check every listed file's size and sha256."""
    d = Path(directory)
    path = d / "manifest.json"
    if not path.is_file():
        previous = sorted(d.parent.glob(f"{d.name}.old-*"))
        hint = (f"; {previous[-1]} holds the dataset that a killed --force rebuild was replacing: rename it "
                f"to {d.name} to use it" if previous else "")
        raise FileNotFoundError(f"{path}: no manifest; {d} is not a finished dataset (an interrupted build "
                                f"leaves only a .tmp-<pid> directory){hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, None, f"malformed JSON ({e.msg})") from e
    for key in ("format_version", "tokenizer", "files", "seq_len"):
        if key not in manifest:
            raise DataFormatError(path, None, key, "missing")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataFormatError(path, None, "format_version",
                              f"dataset format {manifest['format_version']}, this reader expects {FORMAT_VERSION}")
    if verify:
        verify_checksums(d, manifest["files"], path)
    return manifest


def check_tokenizer(manifest: dict, tokenizer) -> None:
    """Raise if ``tokenizer`` is not the one the dataset was built with (vocab size + sha256)."""
    from .base_model import tokenizer_identity

    want, have = manifest["tokenizer"], tokenizer_identity(tokenizer)
    for key in ("vocab_size", "vocab_sha256"):
        if want[key] != have[key]:
            raise ValueError(f"tokenizer mismatch: dataset built with {key}={want[key]}, given {key}={have[key]}")


def load_entities(directory: str | Path) -> list[str]:
    """String ids; the int64 entity id of ``ids[i]`` is ``i``."""
    return read_id_list(Path(directory) / "entities.txt")


def load_relations(directory: str | Path) -> list[str]:
    return read_id_list(Path(directory) / "relations.txt")


def load_entity_tokens(directory: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [total], offsets int64 [N_ent + 1]): entity i's name is tokens[offsets[i]:offsets[i+1]]."""
    d = Path(directory)
    return np.load(d / "entity_tokens.npy"), np.load(d / "entity_token_offsets.npy")


def load_kg_embeddings(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(entity [N_ent, k], relation [N_rel, k]) TransE vectors, rows matching the id lists."""
    m = load_manifest(directory, verify=False)["counts"]
    return read_kg_embeddings(Path(directory) / "kg_embeddings.safetensors", m["entities"], m["relations"])


def load_probes(directory: str | Path, split: str = "stated") -> list[Probe]:
    """``"stated"``: facts stated in the corpus; ``"heldout"``: facts never stated (KG only)."""
    names = {"stated": "probes.jsonl", "heldout": "probes_heldout.jsonl"}
    if split not in names:
        raise ValueError(f"probe split must be one of {sorted(names)}, got {split!r}")
    return read_probes(Path(directory) / names[split])


def load_probe_splits(directory: str | Path) -> dict[str, list[Probe]]:
    """{split: facts} of every probe split the dataset has with at least one fact ("stated" first)."""
    splits = {}
    for split in ("stated", "heldout"):
        try:
            splits[split] = load_probes(directory, split)
        except FileNotFoundError:
            continue
    return {split: facts for split, facts in splits.items() if facts}


class TrelmDataset(Dataset):
    """Sequences of one split, memory-mapped (cheap to pickle into DataLoader workers).

    ``ds[i]`` or ``ds[(epoch, i)]`` -> dict: ``index``, ``epoch``, ``input_ids`` int64 [n],
    ``length`` (real tokens incl. [CLS]/[SEP]), ``spans`` int64 [k, 6] with columns
    (start, end, entity_id, is_target, head_entity_id, relation_id), ``si`` float32 [k].
    """

    def __init__(self, directory: str | Path, split: str = "train", verify: bool = True):
        self.dir = Path(directory)
        self.manifest = load_manifest(self.dir, verify=verify)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{self.dir}: no split {split!r}; available: {self.manifest['splits']}")
        if self.manifest.get("span_columns") != list(SPAN_COLUMNS):
            raise DataFormatError(self.dir / "manifest.json", None, "span_columns", "unexpected span layout")
        self.split = split
        self._arrays: dict[str, np.ndarray] | None = None
        self._n = int(np.load(self.dir / f"{split}_lengths.npy", mmap_mode="r").shape[0])

    def _a(self) -> dict[str, np.ndarray]:
        if self._arrays is None:  # opened lazily, so each worker maps the files itself
            self._arrays = {k: np.load(self.dir / f"{self.split}_{k}.npy", mmap_mode="r") for k in _ARRAYS}
        return self._arrays

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        if not 0 <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} sequences in split {self.split!r}")
        a = self._a()
        lo, hi = int(a["span_offsets"][i]), int(a["span_offsets"][i + 1])
        return {
            "index": int(i),
            "epoch": int(epoch),
            "input_ids": torch.from_numpy(np.asarray(a["tokens"][i], dtype=np.int64)),
            "length": int(a["lengths"][i]),
            "spans": torch.from_numpy(np.array(a["spans"][lo:hi], dtype=np.int64)).reshape(-1, 6),
            "si": torch.from_numpy(np.array(a["si"][lo:hi], dtype=np.float32)),
        }


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit generator seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def continuation_ids(tokenizer) -> torch.Tensor:
    """bool [V]: True for the tokens that continue a word (WordPiece ``##`` pieces; for byte-level
    BPE, tokens without the ``Ġ`` word-start mark), False for word starts and special tokens."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    wordpiece = any(t.startswith("##") for t in tokens)
    return torch.tensor([i not in special and (t.startswith("##") if wordpiece else not t.startswith("Ġ"))
                         for i, t in enumerate(tokens)])


class MLMCollator:
    """Samples -> the batch contract (docs/architecture.md).

    MLM: the real tokens other than [CLS]/[SEP] and outside target spans are grouped into masking
    units (``masking``): ``token``, each token; ``whole_word``, a word-start token with the
    continuation tokens after it (``continuation``: `continuation_ids` of the tokenizer); ``entity``,
    each (non-target) entity mention, and each other token. Units in a random order are chosen
    while they fit in round(mlm_prob * tokens) (at least 1 token when any); a unit that would exceed
    it is passed over. Of the chosen tokens 80% become [MASK], 10% a random non-special token, 10%
    stay. The choice uses a generator seeded by (seed, epoch, index) of the sample.
    ``causal`` (decoders, docs/models.md "Decoders in the trainer"): nothing is masked; every such
    token is an LM label (the state before it predicts it), and the batch's positions are those of
    the predicting states (`prepare_batch(..., causal=True)`).
    Output: input_ids, attention_mask, mlm_labels, cka_labels int64 [B, n]; entity_spans [E, 4],
    target_spans [T, 4] (row, start, end, entity_id); target_triples [T, 2] (head, relation); and
    the index fields of `trelm_fast.data.prepare` (computed here, in the loader's workers, so that
    the training step asks the device nothing), padded to static shapes when ``static``
    (`trelm_fast.data.prepare.pad_static`).
    """

    def __init__(self, manifest: dict, seed: int = 0, mlm_prob: float = 0.15, masking: str = "token",
                 continuation: torch.Tensor | None = None, causal: bool = False, static: bool = False):
        if not 0.0 <= mlm_prob <= 1.0:
            raise ValueError(f"mlm_prob must be in [0, 1], got {mlm_prob}")
        if masking not in MASKING:
            raise ValueError(f"masking must be one of {', '.join(MASKING)}, got {masking!r}")
        t = manifest["tokenizer"]
        if masking == "whole_word" and (continuation is None or continuation.shape != (t["vocab_size"],)):
            raise ValueError(f"whole-word masking needs continuation, a bool [{t['vocab_size']}] tensor "
                             "(continuation_ids of the dataset's tokenizer)")
        self.mask_id, self.seed, self.mlm_prob = t["mask_id"], seed, mlm_prob
        self.masking, self.continuation, self.causal, self.static = masking, continuation, causal, static
        special = torch.tensor(sorted({t["cls_id"], t["sep_id"], t["pad_id"], t["mask_id"]}))
        self.random_ids = torch.arange(t["vocab_size"])[~torch.isin(torch.arange(t["vocab_size"]), special)]

    @classmethod
    def for_config(cls, manifest: dict, cfg, causal: bool = False, device="cpu") -> "MLMCollator":
        """The collator a trelm_fast Config asks for: ``seed``, ``data.mlm_probability``,
        ``data.masking`` (whole-word masking reads the tokenizer of ``model.path``); ``causal``: the
        model is a decoder (`FamilyAdapter.causal`), nothing is masked; ``train.static_shapes`` on
        the training ``device``."""
        continuation = None
        if cfg.data.masking == "whole_word" and not causal:
            from .base_model import load_tokenizer

            tokenizer = load_tokenizer(str(resolve_model_path(cfg.model.path)))
            check_tokenizer(manifest, tokenizer)
            continuation = continuation_ids(tokenizer)
        return cls(manifest, seed=cfg.seed, mlm_prob=cfg.data.mlm_probability,
                   masking="token" if causal else cfg.data.masking, continuation=continuation, causal=causal,
                   static=static_shapes_on(cfg.train.static_shapes, device))

    def _unit_starts(self, sample: dict, allowed: torch.Tensor) -> torch.Tensor:
        """bool [n]: the allowed positions that start a masking unit (a unit runs to the next start or
        to the next position that is not allowed)."""
        starts = allowed.clone()
        if self.masking == "whole_word":
            starts &= ~self.continuation[sample["input_ids"]]
        elif self.masking == "entity":
            for s, e, *_ in sample["spans"][sample["spans"][:, 3] == 0].tolist():
                if bool(allowed[s:e].all()):
                    starts[s + 1:e] = False
        starts[1:] |= allowed[1:] & ~allowed[:-1]  # a unit never spans a position that is not allowed
        return starts & allowed

    def _choose(self, sample: dict, allowed: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The positions to mask (int64, sorted within units): see the class docstring."""
        cand = allowed.nonzero().flatten()
        if not len(cand) or self.mlm_prob <= 0:
            return cand[:0]
        k = min(len(cand), max(1, round(self.mlm_prob * len(cand))))
        if self.masking == "token":
            return cand[torch.randperm(len(cand), generator=g)[:k]]
        unit = torch.cumsum(self._unit_starts(sample, allowed).long(), 0)[cand]  # unit id per candidate
        units = torch.unique_consecutive(unit)
        chosen, total = [], 0
        for u in units[torch.randperm(len(units), generator=g)].tolist():
            members = cand[unit == u]
            if total + len(members) <= k:
                chosen.append(members)
                total += len(members)
            if total == k:
                break
        if not chosen:  # every unit is longer than the budget: the shortest one, so a sequence has a label
            sizes = torch.stack([(unit == u).sum() for u in units])
            chosen.append(cand[unit == units[sizes.argmin()]])
        return torch.cat(chosen)

    def _mask_one(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = sample["input_ids"]
        n, length = ids.shape[0], sample["length"]
        g = torch.Generator().manual_seed(sample_seed(self.seed, sample["epoch"], sample["index"]))
        pos = torch.arange(n)
        allowed = (pos >= 1) & (pos < length - 1)
        cka = torch.full((n,), -100, dtype=torch.long)
        for s, e, *_ in sample["spans"][sample["spans"][:, 3] == 1].tolist():
            allowed[s:e] = False
            cka[s:e] = ids[s:e]
        out, mlm = ids.clone(), torch.full((n,), -100, dtype=torch.long)
        if self.causal:
            mlm[allowed] = ids[allowed]
            return out, mlm, cka
        chosen = self._choose(sample, allowed, g)
        k = len(chosen)
        mlm[chosen] = ids[chosen]
        u = torch.rand(k, generator=g)
        rand_tok = self.random_ids[torch.randint(len(self.random_ids), (k,), generator=g)]
        out[chosen] = torch.where(u < 0.8, torch.full_like(chosen, self.mask_id), torch.where(u < 0.9, rand_tok, ids[chosen]))
        return out, mlm, cka

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        inputs, mlm, cka, att, ents, targets, triples = [], [], [], [], [], [], []
        for row, s in enumerate(samples):
            x, m, c = self._mask_one(s)
            inputs.append(x), mlm.append(m), cka.append(c)
            a = torch.zeros_like(x)
            a[: s["length"]] = 1
            att.append(a)
            sp = s["spans"]
            rc = torch.full((len(sp), 1), row, dtype=torch.long)
            ents.append(torch.cat([rc, sp[:, :3]], 1))
            t = sp[:, 3] == 1
            targets.append(torch.cat([rc[t], sp[t, :3]], 1))
            triples.append(sp[t, 4:6])
        return prepare_batch({
            "input_ids": torch.stack(inputs),
            "attention_mask": torch.stack(att),
            "mlm_labels": torch.stack(mlm),
            "cka_labels": torch.stack(cka),
            "entity_spans": torch.cat(ents).reshape(-1, 4),
            "target_spans": torch.cat(targets).reshape(-1, 4),
            "target_triples": torch.cat(triples).reshape(-1, 2),
        }, causal=self.causal, static=self.static)


class ResumableSampler(Sampler):
    """DistributedSampler-like order that can start mid-epoch; yields ``(epoch, index)`` keys.

    Epoch e's order is a permutation seeded by (seed, e) (or 0..N-1 without shuffle), padded by
    wrapping to a multiple of ``world_size`` (or truncated with ``drop_last``); rank r takes
    positions r, r + world_size, ... ``start`` skips that many of this rank's samples (e.g.
    batches_done * batch_size when resuming). ``set_epoch(e, start=0)`` moves on.
    """

    def __init__(self, dataset_len: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, start: int = 0, drop_last: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.n, self.shuffle, self.seed, self.rank, self.world_size = dataset_len, shuffle, seed, rank, world_size
        self.drop_last = drop_last
        self.per_rank = dataset_len // world_size if drop_last else math.ceil(dataset_len / world_size)
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}], got {start}")
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """This rank's full index order for the current epoch (before ``start`` is applied)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank * self.world_size
        if total > len(idx) and idx:
            idx += (idx * math.ceil(total / len(idx)))[: total - len(idx)]
        return idx[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.order()[self.start:]])

    def __len__(self) -> int:
        return self.per_rank - self.start
