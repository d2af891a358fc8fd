"""CLI: ``python -m trelm_fast.data build --source {synthetic,wiki-geo,files,hf} --out DIR [...]``
and ``python -m trelm_fast.data info DIR`` (verify checksums, print the summary)."""
from __future__ import annotations

import argparse
import json
import signal
import sys

from .formats import ON_BAD_RECORD, DataFormatError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trelm_fast.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a dataset directory")
    b.add_argument("--source", required=True, choices=["synthetic", "wiki-geo", "files", "hf"])
    b.add_argument("--out", required=True, help="output directory (written to OUT.tmp-<pid>, renamed when complete)")
    b.add_argument("--size", default="small", choices=["tiny", "small", "medium"], help="synthetic size")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--on-bad-record", default="error", choices=ON_BAD_RECORD)
    b.add_argument("--long-tail-quantile", type=float, default=0.5)
    b.add_argument("--si-min-quantile", type=float, default=0.5)
    b.add_argument("--targets-per-sequence", type=int, default=2)
    b.add_argument("--long-tail-only", action="store_true")
    b.add_argument("--stated-objects-first", action="store_true",
                   help="injection targets: first the objects of KG facts whose subject the sequence also mentions")
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--valid-fraction", type=float, default=0.05)
    b.add_argument("--transe-dim", type=int, default=64)
    b.add_argument("--transe-epochs", type=int, default=100)
    b.add_argument("--max-pages", type=int, default=None, help="wiki-geo: read at most this many pages")
    b.add_argument("--corpus", help="files: corpus JSONL")
    b.add_argument("--path", help="hf: a `datasets` dataset on disk (save_to_disk directory, or arrow, "
                   "parquet or JSON lines files, or a directory of them)")
    b.add_argument("--text-column", default="text", help="hf: the column holding the document text")
    b.add_argument("--entities-column", default="entities", help="hf: the column holding the entity spans")
    b.add_argument("--kg", help="files, hf: KG TSV")
    b.add_argument("--probes", help="files, hf: probes JSONL (facts stated in the corpus)")
    b.add_argument("--probes-heldout", help="files, hf: probes JSONL (held-out facts)")
    b.add_argument("--force", action="store_true", help="replace OUT if it exists")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    i = sub.add_parser("info", help="verify a dataset's checksums and print its summary")
    i.add_argument("dir")
    return p


def _build(args) -> dict:
    from .build import BuildConfig, build_source

    inputs = {k: v for k, v in (("corpus", args.corpus), ("path", args.path), ("kg", args.kg), ("probes", args.probes),
                                ("probes_heldout", args.probes_heldout)) if v}
    if args.source == "hf":
        inputs.update(text_column=args.text_column, entities_column=args.entities_column)
    cfg = BuildConfig(source=args.source, size=args.size, seed=args.seed, seq_len=args.seq_len,
                      on_bad_record=args.on_bad_record, long_tail_quantile=args.long_tail_quantile,
                      si_min_quantile=args.si_min_quantile, targets_per_sequence=args.targets_per_sequence,
                      long_tail_only=args.long_tail_only, stated_objects_first=args.stated_objects_first,
                      valid_fraction=args.valid_fraction,
                      transe_dim=args.transe_dim, transe_epochs=args.transe_epochs, max_pages=args.max_pages,
                      inputs=inputs)
    return build_source(args.out, cfg, progress=not args.quiet, force=args.force)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through build_dataset, which removes its temporary directory


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            summary = _build(args)
            print(f"built {args.out}")
        else:
            from .loader import load_manifest

            summary = load_manifest(args.dir)["summary"]
            print(f"{args.dir}: checksums OK")
    except (DataFormatError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
