"""The TRELM trainer: the loop only (distributed set-up, data, step, checkpoints, probes, metrics).

    python trelm_fast/train.py                                   # embedded default, CPU, a few minutes
    python trelm_fast/train.py --config my.yaml --train.steps 500 --method no_kmb
    torchrun --nproc_per_node=2 trelm_fast/train.py --config my.yaml
    python trelm_fast/train.py --resume runs/default/checkpoints  # continue exactly where it stopped

Options: `--config FILE` (YAML, see trelm_fast/configs/default.yaml), `--method NAME` (shortcut for
`method.name`), `--resume DIR` (a checkpoint, or a directory of them: the latest is used; without
--config the run continues with the checkpoint's config.yaml), `--overwrite` (a fresh run replaces
an earlier run's outputs in out_dir instead of refusing to start), and any `--section.key VALUE` or
`section.key=VALUE` override. Under torchrun the process group comes from the environment (gloo on
CPU, NCCL on CUDA); every rank reads its own share of the data, rank 0 logs and saves.

Outputs under `out_dir`: metrics.jsonl (one JSON object per logged step), tensorboard/ (event
files), checkpoints/step_* (see trelm_fast/checkpoint.py), model/ (a plain `transformers`
directory with tokenizer files, loadable by `AutoModelForMaskedLM.from_pretrained`), paths.png
(knowledge paths over training) and summary.json. docs/training.md has the details.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: its own directory must not shadow top-level packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from trelm_fast.checkpoint import (CONFIG_FILE, export_pretrained, find_checkpoint, load_checkpoint,
                                   rng_state, save_checkpoint, set_rng_state)
from trelm_fast.config import Config, ConfigError, load_config, resolve_model_path
from trelm_fast.data.formats import DataFormatError
from trelm_fast.probe import ProbeResult, evaluate_probes
from trelm_fast.step import build_step_model, make_step


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (too many non-finite losses in a row)."""


# ---------------------------------------------------------------------------------------------
# distributed set-up

@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group if the environment names one (gloo on CPU, NCCL on CUDA)."""
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, torch.device(("cuda" if device == "auto" else device) if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(),
                torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# the output directory

RUN_OUTPUTS = ("checkpoints", "tensorboard", "model", "metrics.jsonl", "summary.json", "paths.png")


def prepare_out_dir(out_dir: Path, d: Dist, fresh: bool, overwrite: bool) -> None:
    """A fresh run never mixes with an earlier run's outputs: refuse, or with `--overwrite` remove them."""
    existing = [out_dir / name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if fresh and existing:
        if not overwrite:
            raise ConfigError(f"out_dir {out_dir} holds an earlier run ({', '.join(p.name for p in existing)}); "
                              f"continue it with --resume {out_dir / 'checkpoints'}, replace it with --overwrite, "
                              "or choose another out_dir")
        if d.main:
            for path in existing:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    d.barrier()


# ---------------------------------------------------------------------------------------------
# data

def ensure_dataset(cfg: Config, d: Dist) -> Path:
    """The dataset directory, built from `data.source` with `data.build_args` on first use (rank 0)."""
    data_dir = Path(cfg.data.dir)
    if d.main and not (data_dir / "manifest.json").is_file():
        from trelm_fast.data.build import BuildConfig, build_source

        options = dict(cfg.data.build_args)
        quiet = bool(options.pop("quiet", False))
        try:
            build_config = BuildConfig(source=cfg.data.source, **options)
        except TypeError as e:
            raise ConfigError(f"data.build_args: {e} (the keys are BuildConfig fields, see docs/data.md)") from e
        print(f"building the {cfg.data.source} dataset into {data_dir} (first use)", flush=True)
        try:
            build_source(data_dir, build_config, progress=not quiet)
        except (DataFormatError, ValueError, OSError) as e:
            raise ConfigError(f"data.dir: building {data_dir} failed: {e}") from e
    d.barrier()
    cfg.validate(f"data.dir {data_dir}")  # now that it exists: built for model.path's tokenizer?
    return data_dir


def batches(cfg: Config, data_dir: Path, d: Dist, epoch: int, batch_in_epoch: int):
    """Yield (epoch, batch_in_epoch, batch) forever, starting at the given position.

    Each rank reads its own share (ResumableSampler); every batch has `train.batch_size` sequences
    per rank. The order and the MLM masking depend only on (seed, epoch, index), so restarting at a
    position reproduces the batches that follow.
    """
    from torch.utils.data import DataLoader

    from trelm_fast.data.loader import MLMCollator, ResumableSampler, TrelmDataset

    dataset = TrelmDataset(data_dir, "train")
    collate = MLMCollator(dataset.manifest, seed=cfg.seed, mlm_prob=cfg.data.mlm_probability)
    bs = cfg.train.batch_size
    sampler = ResumableSampler(len(dataset), shuffle=True, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                               drop_last=True)
    per_epoch = sampler.per_rank // bs
    if per_epoch == 0:
        raise ConfigError(f"train.batch_size {bs} exceeds the {sampler.per_rank} training sequences per rank "
                          f"of {data_dir}")
    while True:
        sampler.set_epoch(epoch, start=batch_in_epoch * bs)
        # its own generator: creating an iterator must not draw from the global RNG (exact resume)
        loader = DataLoader(dataset, batch_size=bs, sampler=sampler, collate_fn=collate, drop_last=True,
                            num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
        for batch in loader:
            yield epoch, batch_in_epoch, batch
            batch_in_epoch += 1
        epoch, batch_in_epoch = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# metrics

class Metrics:
    """Rank-0 metrics: `out_dir/metrics.jsonl` (appended to when resuming) and TensorBoard events in
    `out_dir/tensorboard` (events at or after the resumed step are purged)."""

    def __init__(self, out_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a" if start_step else "w", encoding="utf-8")
        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def probe_metrics(result: ProbeResult, split: str) -> dict:
    out = {f"probe_{split}/macro_p_at_1": result.macro_p_at_1}
    out.update({f"probe_{split}/{rel}": p for rel, p in result.p_at_1.items()})
    return out


# ---------------------------------------------------------------------------------------------
# the run

def train(cfg: Config, d: Dist, resume: str | None = None, overwrite: bool = False) -> dict:
    """Train `cfg` on this process's rank; returns a summary (probe P@1 before/after, wall-clock)."""
    t_start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    prepare_out_dir(out_dir, d, fresh=resume is None, overwrite=overwrite)
    data_dir = ensure_dataset(cfg, d)
    from trelm_fast.data.base_model import load_tokenizer
    from trelm_fast.data.loader import load_probes

    tokenizer = load_tokenizer(str(resolve_model_path(cfg.model.path)))
    probes = {}  # "stated": facts the corpus states; "heldout": KG facts it never states
    for split in ("stated", "heldout"):
        try:
            probes[split] = load_probes(data_dir, split)
        except FileNotFoundError:
            continue
    probes = {split: facts for split, facts in probes.items() if facts}
    if d.main and not probes:
        print(f"no probe facts in {data_dir}: probing is skipped", flush=True)

    # the model and its step: same seed on every rank, then rank 0's weights broadcast for certainty
    torch.manual_seed(cfg.seed)
    model = build_step_model(cfg.method.name, cfg, data_dir, device=d.device)
    if d.world_size > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    step = make_step(cfg.method.name, model, cfg)

    start_step, epoch, batch_in_epoch = 0, 0, 0
    if resume is not None:
        ck = load_checkpoint(resume, model)
        if ck.state["world_size"] != d.world_size:
            raise ConfigError(f"resume: {ck.path} was written by {ck.state['world_size']} processes, this run has "
                              f"{d.world_size}; the data position is per rank, so resume with the same count")
        step.load_state_dict(ck.state["step"])
        if model.bank is not None:
            model.bank.load_state_dict(ck.state["bank"])
        start_step, epoch, batch_in_epoch = ck.step, ck.state["data"]["epoch"], ck.state["data"]["batch_in_epoch"]
        rngs = ck.state["rng"]
        set_rng_state(rngs[d.rank % len(rngs)])
        if d.main:
            print(f"resumed from {ck.path} at step {start_step}", flush=True)

    metrics = Metrics(out_dir, d.main, start_step)

    def run_probes(at_step: int) -> ProbeResult | None:
        """Probe P@1 on rank 0 (the model is the same on every rank); all splits logged, the first returned."""
        results = {}
        if d.main:
            results = {split: evaluate_probes(model.mlm, tokenizer, facts, device=d.device)
                       for split, facts in probes.items()}
            metrics.log(at_step, {k: v for split, r in results.items() for k, v in probe_metrics(r, split).items()})
        d.barrier()
        return next(iter(results.values()), None)

    def save(at_step: int) -> None:
        rngs = [None] * d.world_size
        if d.world_size > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs[0] = rng_state()
        if d.main:
            state = {"step": step.state_dict(), "data": {"epoch": epoch, "batch_in_epoch": batch_in_epoch},
                     "rng": rngs, "world_size": d.world_size}
            if model.bank is not None:
                state["bank"] = model.bank.state_dict()
            save_checkpoint(out_dir / "checkpoints", at_step, model, state, cfg.to_dict(),
                            keep_last=cfg.train.keep_checkpoints)
        d.barrier()

    before = run_probes(start_step) if start_step == 0 else None
    if before is not None:
        print(f"probe P@1 before training: {before.macro_p_at_1:.4f} (macro over {len(before.p_at_1)} relations, "
              f"{next(iter(probes))} facts)", flush=True)
    t_loop = time.perf_counter()

    data = batches(cfg, data_dir, d, epoch, batch_in_epoch)
    bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not d.main, dynamic_ncols=True, desc=cfg.method.name)
    nonfinite_in_row, tokens, busy = 0, 0, 0.0  # tokens and seconds (data + step) since the last log
    for step_index in range(start_step, cfg.train.steps):
        t0 = time.perf_counter()
        epoch, batch_in_epoch, batch = next(data)
        batch_in_epoch += 1  # the position after this batch: where a resumed run goes on
        result = step.step(batch, step_index, epoch=float(epoch))
        busy += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum()) * d.world_size

        done = step_index + 1
        bar.update(1)

        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            t0 = time.perf_counter()  # waiting for the device here is step time (steps do not wait)
            events, losses = step.nonfinite_events(), result.scalars()
            busy += time.perf_counter() - t0
            for index, skipped, loss in events:  # the host reads the step flags only here
                if not skipped:
                    nonfinite_in_row = 0
                    continue
                nonfinite_in_row += 1
                if d.main:
                    bar.write(f"step {index}: non-finite loss ({loss}), step skipped "
                              f"({nonfinite_in_row} in a row)")
                if nonfinite_in_row >= cfg.train.max_nonfinite:
                    metrics.log(index + 1, {"nonfinite_total": step.nonfinite_total})
                    metrics.close()
                    bar.close()
                    raise TrainingStopped(f"stopping at step {index}: {nonfinite_in_row} non-finite losses in a row "
                                          f"(train.max_nonfinite={cfg.train.max_nonfinite}); lower optim.lr or "
                                          f"resume from an earlier checkpoint in {out_dir / 'checkpoints'}")
            values = {"loss": losses["loss"], "mlm_loss": losses["mlm_loss"], "cka_loss": losses["cka_loss"],
                      "tokens_per_s": tokens / max(busy, 1e-9), "epoch": epoch,
                      "nonfinite_total": step.nonfinite_total,
                      **{k: v for k, v in result.stats.items() if isinstance(v, (int, float))}}
            metrics.log(done, values)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
            tokens, busy = 0, 0.0
        if done % cfg.train.eval_every == 0 and done != cfg.train.steps:
            run_probes(done)
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            save(done)
    bar.close()

    loop_s = time.perf_counter() - t_loop
    after = run_probes(cfg.train.steps)
    summary = {"method": cfg.method.name, "steps": cfg.train.steps, "start_step": start_step,
               "nonfinite_total": step.nonfinite_total, "loop_s": loop_s}
    if d.main:
        export_pretrained(model.mlm, out_dir / "model", tokenizer)
        if step.router is not None and step.router.history.masks:  # knowledge paths over training
            try:
                step.router.history.plot(out_dir / "paths.png")
            except ImportError:
                print("matplotlib is not installed: no paths.png (pip install -e '.[plots]')", flush=True)
        if before is not None:
            summary["probe_before"] = before.macro_p_at_1
        if after is not None:
            summary["probe_after"] = after.macro_p_at_1
            print(after.format(), flush=True)
            print(f"probe P@1 (macro, {next(iter(probes))} facts): "
                  f"{'' if before is None else f'before {before.macro_p_at_1:.4f} -> '}after {after.macro_p_at_1:.4f}",
                  flush=True)
        summary["wall_clock_s"] = time.perf_counter() - t_start
        print(f"wall-clock {summary['wall_clock_s']:.1f} s (training steps {loop_s:.1f} s); "
              f"model exported to {out_dir / 'model'}", flush=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    metrics.close()
    return summary


# ---------------------------------------------------------------------------------------------
# command line

def parse_args(argv: list[str] | None) -> tuple[Config, str | None, bool]:
    """(config, checkpoint to resume from or None, --overwrite) from the command line; exits with a
    message on bad input."""
    parser = argparse.ArgumentParser(prog="trelm_fast/train.py", allow_abbrev=False,
                                     description="Train a TRELM model (see the module docstring).",
                                     epilog="Any other argument is a config override: --section.key VALUE "
                                            "or section.key=VALUE.")
    parser.add_argument("--config", help="YAML configuration file (default: the embedded default)")
    parser.add_argument("--method", help="training method (shortcut for method.name)")
    parser.add_argument("--resume", help="checkpoint directory, or a directory of checkpoints (latest is used)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in out_dir")
    args, overrides = parser.parse_known_args(argv)
    if args.method is not None:
        overrides += ["--method.name", args.method]
    try:
        resume = None
        if args.resume is not None:
            resume = find_checkpoint(args.resume)
            overrides += ["--train.resume", str(resume)]
        config_file = args.config or (resume / CONFIG_FILE if resume is not None else None)
        cfg = load_config(config_file, overrides)
        if resume is None and cfg.train.resume is not None:  # resume given in the config file
            resume = find_checkpoint(cfg.train.resume)
    except (ConfigError, FileNotFoundError) as err:
        parser.error(str(err))
    return cfg, None if resume is None else str(resume), args.overwrite


def main(argv: list[str] | None = None) -> int:
    cfg, resume, overwrite = parse_args(argv)
    d = setup_distributed(cfg.device)
    try:
        train(cfg, d, resume, overwrite)
    except (ConfigError, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    finally:
        if d.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
