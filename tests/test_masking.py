"""MLMCollator's masking units (data.masking): token, whole_word, entity."""
import pytest
import torch

from trelm_fast.config import load_config
from trelm_fast.data.base_model import load_tokenizer
from trelm_fast.data.loader import MLMCollator, TrelmDataset, continuation_ids


@pytest.fixture(scope="module")
def continuation():
    return continuation_ids(load_tokenizer())


def masked(collator, ds, keys):
    """(sample, labelled positions) per key."""
    out = []
    for key in keys:
        sample = ds[key]
        batch = collator([sample])
        out.append((sample, set(batch["mlm_labels"][0].ne(-100).nonzero().flatten().tolist())))
    return out


def test_continuation_ids_of_wordpiece(continuation):
    tok = load_tokenizer()
    ids = tok("unbelievably", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and not continuation[ids[0]] and all(continuation[i] for i in ids[1:])
    assert not continuation[tok.mask_token_id] and not continuation[tok.cls_token_id]


def test_whole_word_masks_whole_words(tiny_dir, continuation):
    ds = TrelmDataset(tiny_dir)
    coll = MLMCollator(ds.manifest, seed=3, mlm_prob=0.3, masking="whole_word", continuation=continuation)
    pieces = 0
    for sample, labelled in masked(coll, ds, [(0, i) for i in range(len(ds))]):
        ids, length = sample["input_ids"], sample["length"]
        targets = {p for s, e, _, t, *_ in sample["spans"].tolist() if t for p in range(s, e)}
        allowed = [p for p in range(1, length - 1) if p not in targets]
        assert labelled and len(labelled) <= round(0.3 * len(allowed))
        for p in labelled:  # the word p is in: back to its start, on to its last piece
            start = p
            while continuation[ids[start]] and start - 1 in allowed:
                start -= 1
            end = p + 1
            while end in allowed and continuation[ids[end]]:
                end += 1
            assert set(range(start, end)) <= labelled, (sample["index"], p)
            pieces += end - start > 1
    assert pieces  # some multi-piece words were masked


def test_entity_masking_masks_mentions_whole(tiny_dir):
    ds = TrelmDataset(tiny_dir)
    coll = MLMCollator(ds.manifest, seed=4, mlm_prob=0.3, masking="entity")
    whole = 0
    for sample, labelled in masked(coll, ds, [(1, i) for i in range(len(ds))]):
        for s, e, _, target, *_ in sample["spans"].tolist():
            inside = labelled & set(range(s, e))
            assert not target or not inside  # target spans are CKA's, never MLM's
            assert inside in (set(), set(range(s, e)))
            whole += bool(inside) and e - s > 1
    assert whole


def test_token_masking_is_unchanged_by_the_option(tiny_dir):
    ds = TrelmDataset(tiny_dir)
    a = MLMCollator(ds.manifest, seed=5)([ds[(0, 3)], ds[(0, 4)]])
    b = MLMCollator(ds.manifest, seed=5, masking="token")([ds[(0, 3)], ds[(0, 4)]])
    assert torch.equal(a["mlm_labels"], b["mlm_labels"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_bad_options(tiny_dir):
    ds = TrelmDataset(tiny_dir)
    with pytest.raises(ValueError, match="masking must be one of token, whole_word, entity, got 'span'"):
        MLMCollator(ds.manifest, masking="span")
    with pytest.raises(ValueError, match=r"whole-word masking needs continuation, a bool \[30522\] tensor"):
        MLMCollator(ds.manifest, masking="whole_word")
    cfg = load_config(None, [f"data.dir={tiny_dir}", "data.masking=whole_word"])
    assert MLMCollator.for_config(ds.manifest, cfg).continuation is not None


def test_config_rejects_unknown_masking():
    from trelm_fast.config import ConfigError

    with pytest.raises(ConfigError, match="data.masking must be one of token, whole_word, entity, got 'words'"):
        load_config(None, ["data.masking=words"])
