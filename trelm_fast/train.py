"""The TRELM trainer: the loop only (distributed set-up, data, step, checkpoints, probes, metrics).

    python trelm_fast/train.py                                   # embedded default, CPU, a few minutes
    python trelm_fast/train.py --config my.yaml --train.steps 500 --method no_kmb
    torchrun --nproc_per_node=2 trelm_fast/train.py --config my.yaml
    python trelm_fast/train.py --resume runs/default/checkpoints  # continue exactly where it stopped

Options: `--config FILE` (YAML, see trelm_fast/configs/default.yaml), `--method NAME` (shortcut for
`method.name`), `--resume DIR` (a checkpoint, or a directory of them: the latest is used, if its
checksums verify; without --config the run continues with the checkpoint's config.yaml),
`--allow-change SETTING` (resume although SETTING differs from the checkpoint's run; only
train.batch_size and seed), `--overwrite` (a fresh run replaces an earlier run's outputs in out_dir
instead of refusing to start), and any `--section.key VALUE` or `section.key=VALUE` override.
Under torchrun the process group comes from the environment (gloo on CPU, NCCL on CUDA); every
rank reads its own share of the data, rank 0 logs and saves.

A resumed run writes into the run directory its checkpoint lies in (`RUN/checkpoints/step_*` ->
`RUN`), whatever out_dir its config.yaml names; an explicit `--out_dir` on the command line must be
new (or forced with --overwrite). Failures a user can cause (bad config, data, checkpoint, settings
changed on resume) end with a one-line `error: ...` and exit status 2; docs/reliability.md.

Outputs under `out_dir`: metrics.jsonl (one JSON object per logged step), tensorboard/ (event
files), checkpoints/step_* (see trelm_fast/checkpoint.py), model/ (a plain `transformers`
directory with tokenizer files, loadable by `AutoModelForMaskedLM.from_pretrained`, a decoder's by
`AutoModelForCausalLM`), paths.png
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
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from trelm_fast.checkpoint import (CONFIG_FILE, Checkpoint, CheckpointError, export_pretrained, find_checkpoint,
                                   load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state)
from trelm_fast.config import Config, ConfigError, load_config, parse_overrides, resolve_model_path
from trelm_fast.data.checksums import sha256_file
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
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for, but this PyTorch build sees no CUDA device "
                          f"(torch {torch.__version__}, CUDA {torch.version.cuda}); use --device cpu or auto")
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

RUN_OUTPUTS = ("checkpoints", "tensorboard", "wandb", "wandb_run_id", "model", "metrics.jsonl", "summary.json",
               "paths.png")


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (`RUN/checkpoints/step_*` -> RUN), else None."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def prepare_out_dir(out_dir: Path, d: Dist, fresh: bool, overwrite: bool, keep: Path | None = None) -> None:
    """A fresh run never mixes with an earlier run's outputs: refuse, or with `--overwrite` remove them
    (never `keep`, the checkpoint a run resumes from)."""
    existing = [out_dir / name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if fresh and existing and keep is not None and keep.resolve().is_relative_to(out_dir.resolve()):
        raise ConfigError(f"out_dir {out_dir} holds {keep}, the checkpoint to resume from, but is not its run "
                          f"directory; resume without --out_dir to continue that run, or choose a new out_dir")
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
    """The dataset directory, built from `data.source` with `data.build_args` on first use (rank 0,
    only if `data.build`), then checked: every file's checksum, the tokenizer, the positions."""
    from trelm_fast.data.loader import load_manifest

    data_dir = Path(cfg.data.dir)
    if not cfg.data.build and not (data_dir / "manifest.json").is_file():  # every rank stops, none waits
        try:
            load_manifest(data_dir, verify=False)
        except FileNotFoundError as e:
            raise ConfigError(f"data.dir: {e}; set data.build: true to build the {cfg.data.source} dataset "
                              "there") from None
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
    load_manifest(data_dir)  # every file as built (before the model reads the KG embeddings)
    cfg.validate(f"data.dir {data_dir}")  # now that it exists: built for model.path's tokenizer?
    return data_dir


def batches(cfg: Config, data_dir: Path, d: Dist, epoch: int, batch_in_epoch: int, causal: bool = False):
    """An iterator of (epoch, batch_in_epoch, batch), forever, starting at the given position
    (``causal``: batches for a decoder, `MLMCollator`).

    The dataset is opened here, before the first batch is asked for (`ensure_dataset` has verified it).
    Each rank reads its own share (ResumableSampler); every batch has `train.batch_size` sequences
    per rank. The order and the MLM masking depend only on (seed, epoch, index), so restarting at a
    position reproduces the batches that follow.
    """
    from torch.utils.data import DataLoader

    from trelm_fast.data.loader import MLMCollator, ResumableSampler, TrelmDataset

    dataset = TrelmDataset(data_dir, "train", verify=False)
    collate = MLMCollator.for_config(dataset.manifest, cfg, causal, d.device)
    bs = cfg.train.batch_size
    sampler = ResumableSampler(len(dataset), shuffle=True, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                               drop_last=True)
    per_epoch = sampler.per_rank // bs
    if per_epoch == 0:
        raise ConfigError(f"train.batch_size {bs} exceeds the {sampler.per_rank} training sequences per rank "
                          f"of {data_dir}")
    if batch_in_epoch >= per_epoch:  # the position of a checkpoint saved at the end of an epoch
        epoch, batch_in_epoch = epoch + 1, 0

    def generate(epoch: int, batch_in_epoch: int):
        while True:
            sampler.set_epoch(epoch, start=batch_in_epoch * bs)
            # its own generator: creating an iterator must not draw from the global RNG (exact resume)
            loader = DataLoader(dataset, batch_size=bs, sampler=sampler, collate_fn=collate, drop_last=True,
                                num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
            for batch in loader:
                yield epoch, batch_in_epoch, batch
                batch_in_epoch += 1
            epoch, batch_in_epoch = epoch + 1, 0

    return generate(epoch, batch_in_epoch)


# ---------------------------------------------------------------------------------------------
# metrics

class Metrics:
    """Rank-0 metrics: `out_dir/metrics.jsonl`, and per `train.report_to` TensorBoard events in
    `out_dir/tensorboard` and a Weights & Biases run (project $WANDB_PROJECT or "trelm-fast", files in
    `out_dir/wandb`, its id kept in `out_dir/wandb_run_id` so that a resumed run continues it;
    WANDB_MODE=offline needs no network).

    A run resumed at step s starts metrics.jsonl with the records of steps <= s from `earlier` (the
    resumed run's metrics.jsonl; records of steps after the checkpoint, logged before the run
    stopped, are dropped, so each step appears once) and purges TensorBoard events from step s on.
    """

    def __init__(self, out_dir: Path, enabled: bool, start_step: int, earlier: Path | None = None,
                 report_to=("tensorboard",), config: dict | None = None):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        kept = self.records_up_to(earlier, start_step) if start_step and earlier is not None else []
        tmp = out_dir / ".metrics.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        self.jsonl = open(path, "a", encoding="utf-8")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step)
        if "wandb" in report_to:
            self.wandb = _wandb_run(out_dir, start_step, config)

    @staticmethod
    def records_up_to(path: Path, step: int) -> list[str]:
        """The lines of metrics file `path` logged at steps <= `step` (a line cut by a kill is dropped)."""
        if not path.is_file():
            return []
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        return kept

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def _wandb_run(out_dir: Path, start_step: int, config: dict | None):
    """A W&B run for `out_dir`: the one recorded in `out_dir/wandb_run_id` when resuming, else a new one."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.report_to: 'wandb' needs the wandb package (pip install wandb)") from None
    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if start_step and id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "trelm-fast"), name=out_dir.name, id=run_id,
                      resume="allow", dir=str(out_dir), config=config)


def probe_metrics(result: ProbeResult, split: str) -> dict:
    out = {f"probe_{split}/macro_p_at_1": result.macro_p_at_1}
    out.update({f"probe_{split}/{rel}": p for rel, p in result.p_at_1.items()})
    return out


# ---------------------------------------------------------------------------------------------
# the run

SAFE_TO_CHANGE = ("train.batch_size", "seed")
"""Run settings a resume may change with `--allow-change`: the data position is kept (converted to the
new batch size, rounded down); with a new seed the rest of the epoch follows the new seed's order."""


def run_identity(cfg: Config, d: Dist, data_dir: Path, model: torch.nn.Module) -> dict:
    """What makes a run the same run, by setting name (stored in checkpoints, compared on resume)."""
    hf = model.mlm.config
    sizes = {f"model.{field}": getattr(hf, attr) for field, attr in model.adapter.size_attrs.items()}
    return {"dataset": sha256_file(data_dir / "manifest.json"), "train.batch_size": cfg.train.batch_size,
            "seed": cfg.seed, "world_size": d.world_size, "method.name": cfg.method.name,
            "model.model_type": hf.model_type, **sizes, "model.vocab_size": hf.vocab_size}


def check_same_run(ck: Checkpoint, now: dict, allow: set[str], data_dir: Path) -> None:
    """Raise ConfigError naming the first setting in which this run differs from `ck`'s run, unless
    it is in `allow` (which may name only SAFE_TO_CHANGE settings)."""
    for name in sorted(allow - set(SAFE_TO_CHANGE)):
        raise ConfigError(f"--allow-change {name}: only {', '.join(SAFE_TO_CHANGE)} may change on resume")
    then = ck.state.get("run")
    if not isinstance(then, dict):
        raise CheckpointError(f"checkpoint: {ck.path / 'state.json'} records no run settings to compare")
    for name, value in now.items():
        if then.get(name) == value or name in allow:
            continue
        if name == "dataset":
            raise ConfigError(f"data.dir {data_dir} is not the dataset {ck.path} was trained on (manifest sha256 "
                              f"{value[:12]}, the run's {str(then.get(name))[:12]}): its entity rows would point "
                              "at other entities; resume with the run's dataset or start a new run")
        hint = (f"pass --allow-change {name} to continue with {value!r}" if name in SAFE_TO_CHANGE else
                "it cannot change within a run: resume with the run's value or start a new run")
        raise ConfigError(f"{name} is {value!r}, but {ck.path} was written by a run with {then.get(name)!r}; {hint}")


def train(cfg: Config, d: Dist, resume: str | None = None, overwrite: bool = False,
          allow_change: tuple[str, ...] = ()) -> dict:
    """Train `cfg` on this process's rank; returns a summary (probe P@1 before/after, wall-clock).

    `resume`: a checkpoint directory. The run writes into `cfg.out_dir`; a resumed run whose out_dir
    is not its checkpoint's run directory starts a new one there (refused if it holds a run, unless
    `overwrite`). `allow_change`: SAFE_TO_CHANGE settings that may differ from the checkpoint's run.
    """
    t_start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    source_run = run_dir_of(Path(resume)) if resume is not None else None
    continuing = source_run is not None and source_run.resolve() == out_dir.resolve()
    prepare_out_dir(out_dir, d, fresh=not continuing, overwrite=overwrite,
                    keep=Path(resume) if resume is not None else None)
    data_dir = ensure_dataset(cfg, d)
    from trelm_fast.data.base_model import load_tokenizer
    from trelm_fast.data.loader import load_probe_splits

    tokenizer = load_tokenizer(str(resolve_model_path(cfg.model.path)))
    probes = load_probe_splits(data_dir)  # "stated": facts the corpus states; "heldout": KG facts it never states
    if d.main and not probes:
        print(f"no probe facts in {data_dir}: probing is skipped", flush=True)

    # the model and its step: same seed on every rank, then rank 0's weights broadcast for certainty
    torch.manual_seed(cfg.seed)
    model = build_step_model(cfg.method.name, cfg, data_dir, device=d.device)
    if d.world_size > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    step = make_step(cfg.method.name, model, cfg)
    identity = run_identity(cfg, d, data_dir, model)

    start_step, epoch, batch_in_epoch = 0, 0, 0
    if resume is not None:
        ck = load_checkpoint(resume)
        check_same_run(ck, identity, set(allow_change), data_dir)
        load_weights(ck.path, model)
        step.load_state_dict(ck.state["step"])
        if model.bank is not None:
            model.bank.load_state_dict(ck.state["bank"])
        start_step, epoch, batch_in_epoch = ck.step, ck.state["data"]["epoch"], ck.state["data"]["batch_in_epoch"]
        batch_in_epoch = batch_in_epoch * ck.state["run"]["train.batch_size"] // cfg.train.batch_size
        rngs = ck.state["rng"]
        set_rng_state(rngs[d.rank % len(rngs)])
        if d.main:
            print(f"resumed from {ck.path} at step {start_step}, writing into {out_dir}", flush=True)

    metrics = Metrics(out_dir, d.main, start_step, None if source_run is None else source_run / "metrics.jsonl",
                      cfg.train.report_to, cfg.to_dict())

    def run_probes(at_step: int) -> dict[str, ProbeResult]:
        """Probe P@1 of every split on rank 0 (the model is the same on every rank), logged; {} elsewhere."""
        results = {}
        if d.main:
            results = {split: evaluate_probes(model.mlm, tokenizer, facts, device=d.device)
                       for split, facts in probes.items()}
            metrics.log(at_step, {k: v for split, r in results.items() for k, v in probe_metrics(r, split).items()})
        d.barrier()
        return results

    def save(at_step: int) -> None:
        rngs = [None] * d.world_size
        if d.world_size > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs[0] = rng_state()
        if d.main:
            state = {"step": step.state_dict(), "data": {"epoch": epoch, "batch_in_epoch": batch_in_epoch},
                     "rng": rngs, "run": identity}
            if model.bank is not None:
                state["bank"] = model.bank.state_dict()
            save_checkpoint(out_dir / "checkpoints", at_step, model, state, cfg.to_dict(),
                            keep_last=cfg.train.keep_checkpoints)
        d.barrier()

    data = batches(cfg, data_dir, d, epoch, batch_in_epoch, model.causal)
    before_all = run_probes(start_step) if start_step == 0 else {}
    before = next(iter(before_all.values()), None)
    if before is not None:
        print(f"probe P@1 before training: {before.macro_p_at_1:.4f} (macro over {len(before.p_at_1)} relations, "
              f"{next(iter(probes))} facts)", flush=True)
    t_loop = time.perf_counter()

    bar = tqdm(total=cfg.train.steps, initial=start_step, disable=not d.main, dynamic_ncols=True, desc=cfg.method.name)
    nonfinite_in_row, tokens, busy = 0, 0, 0.0  # tokens and seconds (data + step) since the last log
    for step_index in range(start_step, cfg.train.steps):
        t0 = time.perf_counter()
        micro = []  # the step's train.grad_accum_steps micro-batches
        for _ in range(cfg.train.grad_accum_steps):
            epoch, batch_in_epoch, batch = next(data)
            micro.append(batch)
        batch_in_epoch += 1  # the position after the last micro-batch: where a resumed run goes on
        result = step.step(micro, step_index, epoch=float(epoch))
        busy += time.perf_counter() - t0
        tokens += sum(int(b["attention_mask"].sum()) for b in micro) * d.world_size

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
            values = {**{k: v for k, v in losses.items() if k != "skipped_nonfinite"},  # losses, grad_norm
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
    after_all = before_all if cfg.train.steps == 0 else run_probes(cfg.train.steps)
    after = next(iter(after_all.values()), None)
    summary = {"method": cfg.method.name, "steps": cfg.train.steps, "start_step": start_step,
               "nonfinite_total": step.nonfinite_total, "loop_s": loop_s}
    if d.main:
        export_pretrained(model.mlm, out_dir / "model", tokenizer)
        if step.router is not None and step.router.history.masks:  # knowledge paths over training
            try:
                step.router.history.plot(out_dir / "paths.png")
            except ImportError:
                print("matplotlib is not installed: no paths.png (pip install -e '.[plots]')", flush=True)
        # macro P@1 of the first split (stated facts when the dataset has them), and of every split
        if before is not None:
            summary["probe_before"] = before.macro_p_at_1
            summary["probes_before"] = {split: r.macro_p_at_1 for split, r in before_all.items()}
        if after is not None:
            summary["probe_after"] = after.macro_p_at_1
            summary["probes_after"] = {split: r.macro_p_at_1 for split, r in after_all.items()}
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

@dataclass
class Launch:
    """What the command line asks for: the config, the checkpoint to resume from (verified), whether
    to replace an earlier run's outputs, and the settings allowed to change on resume."""
    cfg: Config
    resume: str | None
    overwrite: bool
    allow_change: tuple[str, ...]


def parse_args(argv: list[str] | None) -> Launch:
    """The launch the command line asks for; exits with a one-line message (status 2) on bad input.

    Resuming, out_dir is the checkpoint's run directory unless `out_dir` is given on the command line:
    an out_dir from a config file (the checkpoint's own included) never decides where a resumed run
    writes or deletes.
    """
    parser = argparse.ArgumentParser(prog="trelm_fast/train.py", allow_abbrev=False,
                                     description="Train a TRELM model (see the module docstring).",
                                     epilog="Any other argument is a config override: --section.key VALUE "
                                            "or section.key=VALUE.")
    parser.add_argument("--config", help="YAML configuration file (default: the embedded default)")
    parser.add_argument("--method", help="training method (shortcut for method.name)")
    parser.add_argument("--resume", help="checkpoint directory, or a directory of checkpoints (the latest is "
                                         "used if it verifies)")
    parser.add_argument("--allow-change", action="append", default=[], metavar="SETTING",
                        help=f"resume although SETTING differs from the checkpoint's run ({', '.join(SAFE_TO_CHANGE)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in out_dir")
    args, overrides = parser.parse_known_args(argv)
    if args.method is not None:
        overrides += ["--method.name", args.method]
    try:
        explicit_out_dir = "out_dir" in parse_overrides(list(overrides))
        resume = None
        if args.resume is not None:
            resume = find_checkpoint(args.resume)
            overrides += ["--train.resume", str(resume)]
        config_file = args.config or (resume / CONFIG_FILE if resume is not None else None)
        cfg = load_config(config_file, overrides)
        if resume is None and cfg.train.resume is not None:  # resume given in the config file
            resume = find_checkpoint(cfg.train.resume)
        if resume is not None and not explicit_out_dir:
            run_dir = run_dir_of(resume)
            if run_dir is None:
                raise ConfigError(f"resume: {resume} is not in a run's checkpoints/ directory; name the directory "
                                  "this run writes into with --out_dir")
            cfg.out_dir = str(run_dir)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        parser.error(str(err))
    return Launch(cfg, None if resume is None else str(resume), args.overwrite, tuple(args.allow_change))


def main(argv: list[str] | None = None) -> int:
    launch = parse_args(argv)
    d = None
    try:
        d = setup_distributed(launch.cfg.device)
        train(launch.cfg, d, launch.resume, launch.overwrite, launch.allow_change)
    except (ConfigError, CheckpointError, DataFormatError) as err:  # caused by the user's input
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if d is not None and d.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
