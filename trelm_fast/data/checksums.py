"""File checksums of a directory: what a dataset manifest and a checkpoint's checksums.json list.

``file_checksums(d)`` -> ``{name: {"sha256": hex, "bytes": int}}`` for the files directly in ``d``;
``verify_checksums(d, files, listed_in)`` checks them again. Listed names are confined to ``d``: a
name with a directory part (``../../etc/hostname``, ``sub/x``, an absolute path) is a bad record of
``listed_in``, never opened.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .formats import DataFormatError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_checksums(d: Path, names: list[str] | None = None) -> dict[str, dict]:
    """Size and sha256 of ``names`` (default: every file directly in ``d``), by name."""
    names = sorted(p.name for p in d.iterdir() if p.is_file()) if names is None else names
    return {name: {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size} for name in names}


def verify_checksums(d: Path, files: dict, listed_in: Path) -> None:
    """Raise DataFormatError naming the first file of ``files`` (as written by `file_checksums`) that
    is outside ``d``, missing, or of another size or sha256 than listed in ``listed_in``."""
    if not isinstance(files, dict):
        raise DataFormatError(listed_in, None, "files", f"expected an object, got {type(files).__name__}")
    for name, meta in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DataFormatError(listed_in, None, "files", f"{name!r} is not a file name inside {d}")
        if not isinstance(meta, dict) or not {"sha256", "bytes"} <= set(meta):
            raise DataFormatError(listed_in, None, f"files.{name}", "expected {\"sha256\": ..., \"bytes\": ...}")
        f = d / name
        if not f.is_file():
            raise DataFormatError(f, None, None, f"listed in {listed_in} but missing")
        if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise DataFormatError(f, None, None, f"checksum mismatch with {listed_in}: the file changed after it "
                                  "was written")
