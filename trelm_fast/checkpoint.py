"""Training checkpoints: atomic directories of safetensors + JSON, the last K kept, export to `transformers`.

One checkpoint is a directory `ROOT/step_00000100/` holding
  model.safetensors   the training model's weights (tied weights stored once)
  state.safetensors   every tensor leaf of the training-state tree (optimizer moments and slice
                      states, memory-bank tensors and entity table, paths, torch RNG states)
  state.json          the state tree with tensor leaves replaced by references (step, schedule,
                      data position, python/numpy RNG, ...)
  config.yaml         the run's configuration (what `--resume` continues with)
  checksums.json      size and sha256 of the four files above (written last)

Atomicity: a checkpoint is written under `ROOT/.tmp-step_...`, every file fsynced, then renamed to
its final name and the directory fsynced. A `step_*` directory therefore exists only once complete,
so a kill at any moment leaves the previous checkpoint loadable; leftover `.tmp-*` directories are
ignored and removed by the next save. Old checkpoints beyond the last K are renamed to `.del-*`
before deletion, for the same reason. Deletions happen only inside ROOT.

Integrity: loading verifies checksums.json first (with the dataset manifest's helpers,
trelm_fast/data/checksums.py): a file changed, truncated or missing after the save is a
`CheckpointError` naming it. Resolving a root (`find_checkpoint`) takes the latest checkpoint only
if it verifies; otherwise the error names it and the newest one that does, for the user to pass
explicitly.

Loading never unpickles: tensors come from safetensors, everything else from JSON or safe YAML.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from trelm_fast.data.checksums import file_checksums, verify_checksums
from trelm_fast.data.formats import DataFormatError

_STEP_DIR = re.compile(r"^step_(\d+)$")
MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
CHECKSUMS_FILE = "checksums.json"
FORMAT_VERSION = 2  # 2: checksums.json


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, another format, weights that do not
    fit); the message names the checkpoint file."""


# ---------------------------------------------------------------------------------------------
# state trees <-> (tensors, JSON)

def flatten_state(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numpy arrays, scalars, strings, None,
    torch dtypes) into a JSON-able skeleton and a flat dict of CPU tensors for safetensors.

    Dicts with non-string keys (optimizer states are keyed by int) and tuples keep their types.
    Raises TypeError naming the path of any leaf it cannot store.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            key = f"{len(tensors)}:{path}"
            # a private contiguous CPU copy: safetensors refuses tensors that share storage
            tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": key}
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, torch.dtype):
            return {"__dtype__": str(obj).removeprefix("torch.")}
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: enc(v, f"{path}/{k}") for k, v in obj.items()}
            for k in obj:
                if not isinstance(k, (str, int, bool, float)) and k is not None:
                    raise TypeError(f"checkpoint: dict key {k!r} of type {type(k).__name__} at {path or '/'} cannot be stored")
            return {"__dict__": [[k, enc(v, f"{path}/{k}")] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {path or '/'}; "
                        "state_dict() values must be tensors, arrays, scalars, strings or containers of them")

    return enc(tree, ""), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    def dec(obj: Any) -> Any:
        if isinstance(obj, list):
            return [dec(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise KeyError(f"checkpoint: tensor {key!r} referenced in {STATE_FILE} is missing from {TENSORS_FILE}")
            return tensors[key]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
        if "__dtype__" in obj:
            dtype = getattr(torch, obj["__dtype__"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"checkpoint: unknown torch dtype {obj['__dtype__']!r}")
            return dtype
        if "__tuple__" in obj:
            return tuple(dec(v) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: dec(v) for k, v in obj["__dict__"]}
        return {k: dec(v) for k, v in obj.items()}

    return dec(skeleton)


# ---------------------------------------------------------------------------------------------
# RNG

def rng_state() -> dict[str, Any]:
    """This process's RNG states: python `random`, numpy's global generator, torch CPU and CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only where CUDA is in use)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# save / load

@dataclass
class Checkpoint:
    """A loaded checkpoint: its directory, step, training-state tree and config (a plain dict)."""
    path: Path
    step: int
    state: dict[str, Any]
    config: dict[str, Any]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless every file of checkpoint `path` matches its checksums.json."""
    path = Path(path)
    verify_listed_files(path, path / CHECKSUMS_FILE, {MODEL_FILE, TENSORS_FILE, STATE_FILE, CONFIG_FILE},
                        f"earlier version (format < {FORMAT_VERSION})")


def verify_listed_files(path: Path, listing: Path, required: set[str], older: str) -> None:
    """Raise CheckpointError unless `listing` (sizes and sha256 by file name, `file_checksums`) exists,
    lists at least `required`, and every file it lists in `path` matches. `older`: what wrote a
    checkpoint without a listing (named in the error)."""
    if not listing.is_file():
        raise CheckpointError(f"checkpoint: {listing} is missing: {path} is incomplete or was written by an {older}")
    try:
        files = json.loads(listing.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint: {listing} is not valid JSON ({err})") from None
    if not isinstance(files, dict) or not required <= set(files):
        raise CheckpointError(f"checkpoint: {listing} does not list the checkpoint files ({', '.join(sorted(required))})")
    try:
        verify_checksums(path, files, listing)
    except DataFormatError as err:
        raise CheckpointError(f"checkpoint: {err}") from None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve `--resume PATH` to a verified checkpoint: `PATH` itself, or the latest `step_*` under it.

    A latest checkpoint that fails verification is never skipped silently: the CheckpointError names
    it and the newest earlier one that verifies (to be passed explicitly).
    """
    path = Path(path)
    if (path / STATE_FILE).is_file() or (path / CHECKSUMS_FILE).is_file() or _STEP_DIR.match(path.name):
        verify_checkpoint(path)
        return path
    dirs = checkpoint_dirs(path)
    if not dirs:
        raise FileNotFoundError(f"resume: {path} is neither a checkpoint (no {STATE_FILE}) "
                                "nor a directory holding step_* checkpoints")
    try:
        verify_checkpoint(dirs[-1])
    except CheckpointError as err:
        previous = next((p for p in reversed(dirs[:-1]) if _verifies(p)), None)
        offer = (f"; the newest complete one is {previous}: resume from it with --resume {previous}"
                 if previous else "; no earlier checkpoint there verifies either")
        raise CheckpointError(f"{err} (the latest checkpoint under {path}){offer}") from None
    return dirs[-1]


def _verifies(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module, state: dict[str, Any],
                    config: dict[str, Any], keep_last: int = 3) -> Path:
    """Write `ROOT/step_{step:08d}` atomically and keep only the `keep_last` newest checkpoints.

    `model`: the (unwrapped) training module; `state`: the rest of the training state as a tree
    (see `flatten_state`); `config`: a dict of plain values (written as YAML). Returns the
    checkpoint's directory.
    """
    if keep_last < 1:
        raise ValueError(f"checkpoint: keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()

    save_model(model, str(tmp / MODEL_FILE))
    skeleton, tensors = flatten_state(state)
    save_file(tensors, str(tmp / TENSORS_FILE))
    for f in (MODEL_FILE, TENSORS_FILE):
        _fsync(tmp / f)
    _write_text(tmp / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    _write_text(tmp / STATE_FILE, json.dumps({"format": FORMAT_VERSION, "step": int(step), "state": skeleton}))
    _write_text(tmp / CHECKSUMS_FILE, json.dumps(file_checksums(tmp, [MODEL_FILE, TENSORS_FILE, STATE_FILE,
                                                                      CONFIG_FILE]), indent=1))
    _fsync(tmp)

    final = root / name
    if final.exists():  # re-saving the same step (for example after a resume): move the old one away
        final.rename(root / f".del-{name}-{os.getpid()}")
    tmp.rename(final)
    _fsync(root)

    for old in checkpoint_dirs(root)[:-keep_last]:
        doomed = old.with_name(f".del-{old.name}")
        old.rename(doomed)
    for doomed in root.glob(".del-step_*"):
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None) -> Checkpoint:
    """Load a checkpoint (or the latest under a root, see `find_checkpoint`) onto the CPU, after
    verifying its checksums. If `model` is given its weights are loaded in place (`load_weights`).

    Raises CheckpointError (naming the file) for anything wrong with the checkpoint itself.
    """
    path = find_checkpoint(path)
    try:
        doc = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint: {path / STATE_FILE} is not valid JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
        got = doc.get("format") if isinstance(doc, dict) else doc
        raise CheckpointError(f"checkpoint: {path / STATE_FILE} has format {got!r}, "
                              f"this version reads format {FORMAT_VERSION}")
    try:
        state = unflatten_state(doc["state"], load_file(str(path / TENSORS_FILE), device="cpu"))
        config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
        step = int(doc["step"])
    except (KeyError, ValueError, TypeError, SafetensorError, yaml.YAMLError) as err:
        raise CheckpointError(f"checkpoint: {path} cannot be read: {err}") from None
    if model is not None:
        load_weights(path, model)
    return Checkpoint(path=path, step=step, state=state, config=config)


def load_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load checkpoint `path`'s weights into `model` in place (strict: names and shapes must match)."""
    try:
        load_model(model, str(Path(path) / MODEL_FILE), strict=True)
    except (RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint: weights in {Path(path) / MODEL_FILE} do not fit the model: "
                              f"{' '.join(str(err).split())}") from None


# ---------------------------------------------------------------------------------------------
# export

def export_pretrained(mlm: torch.nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write a plain `transformers` directory loadable by `AutoModelForMaskedLM.from_pretrained`
    (a decoder's by `AutoModelForCausalLM`).

    `mlm`: the training LM, e.g. `BertForMaskedLM` or `LlamaForCausalLM` (FFNs possibly swapped); a copy
    is unswapped with `trelm_fast.unswap_ffn`, so training can go on with `mlm`. `tokenizer`: saved
    beside the weights when given. The directory is written aside and renamed into place.
    """
    from trelm_fast.ffn import unswap_ffn

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain = unswap_ffn(copy.deepcopy(mlm)).to("cpu")
    plain.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        old = out.with_name(f".del-{out.name}-{os.getpid()}")
        out.rename(old)
        shutil.rmtree(old)
    tmp.rename(out)
    return out
