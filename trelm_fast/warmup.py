"""MLM-head warm-up: a starting point whose MLM head already predicts tokens.

    python -m trelm_fast.warmup --data data/wiki-geo --out data_cache/warm    # prints the directory
    python trelm_fast/train.py model.path=data_cache/warm/head-<key> ...      # every method starts there

An encoder shipped without an MLM head (the bundled MiniLM) gets a freshly initialized one, and a
short run of any method then mostly re-learns that head instead of learning facts. `warm_up_head`
trains only the head (the transform's dense layer and LayerNorm and the decoder bias; the decoder
weight is the word-embedding matrix, frozen with the encoder) with the masked-LM loss at the
labelled positions of the dataset's train split, and exports the whole model as a plain
`transformers` directory with the tokenizer and `warmup.json`: the settings, the MLM loss on the
valid split and the probe P@1 of every split, before and after.

The result is cached: the directory is named by a hash of the base model's files, the dataset's
manifest and the settings, and counts as built once `warmup.json` is in it (written last).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

import torch

from trelm_fast.checkpoint import export_pretrained
from trelm_fast.config import ModelConfig, resolve_model_path
from trelm_fast.data.base_model import load_tokenizer
from trelm_fast.data.checksums import sha256_file
from trelm_fast.data.loader import MLMCollator, ResumableSampler, TrelmDataset, check_tokenizer, load_probe_splits
from trelm_fast.losses import MLMHead, mlm_loss_at
from trelm_fast.model import build_mlm
from trelm_fast.optim import configure_trainable
from trelm_fast.probe import evaluate_probes

REPORT = "warmup.json"


@dataclass(frozen=True)
class WarmupConfig:
    """Warm-up settings: AdamW steps of ``batch_size`` sequences at ``lr`` (constant), masking as the
    trainer's default collator; ``valid_batches`` batches of the valid split measure the MLM loss."""
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    mlm_probability: float = 0.15
    valid_batches: int = 8


def _model_fingerprint(model_dir: Path) -> str:
    """sha256 over the names and contents of the model directory's config and weight files."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors", ".bin")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def warmup_dir(model_path: str, dataset_dir: str | os.PathLike, out_root: str | os.PathLike,
               wcfg: WarmupConfig) -> Path:
    """Where the warm-up of (base model, dataset, settings) is cached: ``out_root/head-<hash>``."""
    if not (Path(dataset_dir) / "manifest.json").is_file():
        raise FileNotFoundError(f"{dataset_dir}: no dataset here (no manifest.json); build one with "
                                "python -m trelm_fast.data build")
    key = json.dumps({"model": _model_fingerprint(resolve_model_path(model_path)),
                      "dataset": sha256_file(Path(dataset_dir) / "manifest.json"), **asdict(wcfg)}, sort_keys=True)
    return Path(out_root) / f"head-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _batches(ds: TrelmDataset, wcfg: WarmupConfig):
    """Batches of ``ds`` forever, epoch after epoch, in the trainer's order and masking."""
    collate = MLMCollator(ds.manifest, seed=wcfg.seed, mlm_prob=wcfg.mlm_probability)
    sampler = ResumableSampler(len(ds), shuffle=True, seed=wcfg.seed, drop_last=True)
    if len(sampler) < wcfg.batch_size:
        raise ValueError(f"warm-up batch_size {wcfg.batch_size} exceeds the {len(sampler)} sequences of "
                         f"{ds.dir} split {ds.split!r}")
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        keys = list(sampler)
        for i in range(0, len(keys) - wcfg.batch_size + 1, wcfg.batch_size):
            yield collate([ds[k] for k in keys[i:i + wcfg.batch_size]])
        epoch += 1


def _mlm_loss(mlm, head: MLMHead, batch: dict) -> torch.Tensor:
    """Mean cross-entropy at the labelled positions (`mlm_loss_at`); the encoder runs without gradient."""
    with torch.no_grad():
        hidden = mlm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return mlm_loss_at(hidden, batch["mlm_positions"], batch["mlm_targets"], head)


def warm_up_head(model_path: str, dataset_dir: str | os.PathLike, out_root: str | os.PathLike,
                 wcfg: WarmupConfig = WarmupConfig(), log=print) -> Path:
    """The cached warm-up directory (see the module docstring), trained now unless it exists."""
    out = warmup_dir(model_path, dataset_dir, out_root, wcfg)
    if (out / REPORT).is_file():
        return out
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(str(resolve_model_path(model_path)))
    train, valid = TrelmDataset(dataset_dir, "train"), TrelmDataset(dataset_dir, "valid")
    check_tokenizer(train.manifest, tokenizer)
    torch.manual_seed(wcfg.seed)
    mlm = build_mlm(ModelConfig(path=model_path, init="pretrained")).eval()  # no dropout: fixed features
    configure_trainable(mlm, {"head"})
    head = MLMHead.from_model(mlm)
    params = [p for p in mlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=wcfg.lr)
    valid_batches = list(islice(_batches(valid, replace(wcfg, batch_size=min(wcfg.batch_size, len(valid)))),
                                wcfg.valid_batches))
    probes = load_probe_splits(dataset_dir)

    def measure() -> dict:
        with torch.no_grad():
            loss = sum(float(_mlm_loss(mlm, head, b)) for b in valid_batches) / len(valid_batches)
        return {"valid_mlm_loss": loss, "probes": {split: evaluate_probes(mlm, tokenizer, facts).macro_p_at_1
                                                   for split, facts in probes.items()}}

    before = measure()
    log(f"warm-up of the MLM head: {wcfg.steps} steps; valid MLM loss {before['valid_mlm_loss']:.3f}")
    for batch in islice(_batches(train, wcfg), wcfg.steps):
        loss = _mlm_loss(mlm, head, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = measure()
    log(f"valid MLM loss after: {after['valid_mlm_loss']:.3f}; probe P@1 {after['probes']}")
    export_pretrained(mlm, out, tokenizer)
    report = {"settings": asdict(wcfg), "base_model": str(resolve_model_path(model_path)),
              "dataset": str(Path(dataset_dir).resolve()), "before": before, "after": after,
              "seconds": time.perf_counter() - t0}
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / REPORT)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trelm_fast.warmup", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="base model directory or alias (model.path)")
    p.add_argument("--data", required=True, help="a built dataset directory (its tokenizer must be the model's)")
    p.add_argument("--out", default="data_cache/warm", help="cache root; the result is OUT/head-<hash>")
    for name, value in asdict(WarmupConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    wcfg = WarmupConfig(**{k: getattr(args, k) for k in asdict(WarmupConfig())})
    try:
        out = warm_up_head(args.model, args.data, args.out, wcfg, log=lambda m: print(m, file=sys.stderr))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
