"""`python benchmarks/static_shapes.py --data DIR [--batch-size 16] [--batches 200] [--steps 15] [--method trelm]
[--device cpu]`

What `train.static_shapes` costs (docs/training.md, "Static shapes"):

- padding waste: over ``--batches`` batches of a built dataset (`MLMCollator`, the trainer's
  masking), the real and padded rows of every content-dependent index field, and how many distinct
  shape tuples (one per CUDA graph a capture would need) the batches have with and without padding;
- step time: the median of ``--steps`` plain steps (no refresh) of ``--method`` with static shapes
  never / always, interleaved in one process on the same batches, on a small random-init model
  (2 layers, d = 64) with the dataset's tokenizer vocabulary.

Prints one JSON object. The dataset must have been built for the MiniLM tokenizer (`model.path`
minilm), e.g. data_cache/bench-synthetic-small.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from harness import _sync, interpret_triton_without_gpu

FIELDS = {"mlm": "mlm_targets", "cka": "cka_targets", "target_spans": "target_spans",
          "target_tokens": "target_positions", "entity_spans": "entity_spans"}


def _rows(batch: dict, field: str) -> int:
    t = batch[field]
    return t.shape[1] if field == "target_positions" else t.shape[0]


def padding_waste(data: str, batch_size: int, batches: int, cfg) -> dict:
    """Per field: real rows, padded rows, padded / real; distinct shape tuples without and with padding."""
    from trelm_fast.data.loader import MLMCollator, TrelmDataset
    from trelm_fast.data.prepare import pad_static

    ds = TrelmDataset(data, "train", verify=False)
    collate = MLMCollator.for_config(ds.manifest, cfg)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    real = dict.fromkeys(FIELDS, 0)
    padded = dict.fromkeys(FIELDS, 0)
    shapes_real, shapes_padded = set(), set()
    for i in range(min(batches, len(ds) // batch_size)):
        batch = collate([ds[k] for k in order[i * batch_size:(i + 1) * batch_size]])
        static = pad_static(batch)
        shapes_real.add(tuple(_rows(batch, f) for f in FIELDS.values()))
        shapes_padded.add(tuple(_rows(static, f) for f in FIELDS.values()))
        for name, f in FIELDS.items():
            real[name] += _rows(batch, f)
            padded[name] += _rows(static, f)
    return {"fields": {name: {"real": real[name], "padded": padded[name],
                              "ratio": round(padded[name] / max(1, real[name]), 3)} for name in FIELDS},
            "distinct_shapes": {"never": len(shapes_real), "always": len(shapes_padded)},
            "batches": i + 1, "batch_size": batch_size, "seq_len": ds.manifest["seq_len"]}


def step_times(data: str, batch_size: int, steps: int, method: str, device: str, overrides: list[str]) -> dict:
    """Median ms of plain steps with static shapes never / always, interleaved, on the same batches."""
    from trelm_fast.config import load_config
    from trelm_fast.data.loader import MLMCollator, TrelmDataset
    from trelm_fast.step import build_step_model, make_step

    ds = TrelmDataset(data, "train", verify=False)
    device = torch.device(device)
    runs = {}
    for static in ("never", "always"):
        cfg = load_config(None, overrides + [f"train.static_shapes={static}"])
        torch.manual_seed(0)
        model = build_step_model(method, cfg, data, device=device)
        runs[static] = make_step(method, model, cfg)
    collate = MLMCollator.for_config(ds.manifest, cfg)
    batches = [collate([ds[k] for k in range(i * batch_size, (i + 1) * batch_size)]) for i in range(steps + 3)]
    times = {static: [] for static in runs}
    for i, batch in enumerate(batches):
        for static, step in runs.items():
            prepared = step.prepare(batch)  # host work of the loader's workers and the step: not timed
            _sync(device)
            t0 = time.perf_counter()
            step(prepared, i)
            _sync(device)
            if i >= 3:  # step 0 refreshes the paths; 1-2 warm up
                times[static].append(1e3 * (time.perf_counter() - t0))
    return {static: round(statistics.median(t), 2) for static, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--data", required=True, help="a built dataset directory (MiniLM tokenizer)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=200, help="batches for the padding waste")
    p.add_argument("--steps", type=int, default=15, help="timed steps per setting (0: no timing)")
    p.add_argument("--method", default="trelm")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    interpret_triton_without_gpu()
    from trelm_fast.config import load_config

    overrides = [f"data.dir={args.data}", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2",
                 "model.intermediate_size=128", "model.dropout=0.0", "routing.refresh=100000",
                 f"train.batch_size={args.batch_size}", "train.precision=fp32", f"device={args.device}"]
    out = {"padding": padding_waste(args.data, args.batch_size, args.batches, load_config(None, overrides))}
    if args.steps:
        out["step_ms"] = step_times(args.data, args.batch_size, args.steps, args.method, args.device, overrides)
        out["step"] = {"method": args.method, "device": args.device, "model": "2 layers, d 64, I 128, fp32"}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
