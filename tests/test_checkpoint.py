"""Checkpoints: state trees through safetensors + JSON, RNG, atomic save, keep-last-K, kill during a
save, export to a plain `transformers` directory."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from trelm_fast import checkpoint as ck
from trelm_fast.data.checksums import file_checksums


def tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(tree_equal, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def roundtrip(tree, tmp_path):
    skeleton, tensors = ck.flatten_state(tree)
    from safetensors.torch import load_file, save_file
    save_file(tensors, tmp_path / "t.safetensors")
    (tmp_path / "s.json").write_text(json.dumps(skeleton))
    return ck.unflatten_state(json.loads((tmp_path / "s.json").read_text()), load_file(tmp_path / "t.safetensors"))


def test_state_tree_roundtrip(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    lin(torch.randn(7, 5)).sum().backward()
    opt.step()
    base = torch.arange(12.0)
    tree = {
        "optimizer": opt.state_dict(),  # int keys, nested param_groups with tuples (betas)
        "bank": {"local": torch.randn(4, 3, dtype=torch.bfloat16), "counts": torch.tensor([1, 0, 2, 5]),
                 "empty": torch.zeros(0, 3), "mask": torch.tensor([True, False]), "dtype": torch.float16},
        "views": [base[:6], base[6:].view(2, 3), base[::2]],  # shared storage and non-contiguous
        "data": {"epoch": 2, "position": 123456789012, "order": np.arange(5, dtype=np.int32)},
        "misc": (None, 0.5, float("nan"), float("inf"), "s", True),
        "__weird": {3: "int key", "x": 1},
    }
    back = roundtrip(tree, tmp_path)
    assert tree_equal(tree, back)
    opt2 = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # what the trainer does with it


def test_state_tree_unsupported_leaf_names_its_path():
    with pytest.raises(TypeError, match=r"cannot store a set at /a/b/1"):
        ck.flatten_state({"a": {"b": [1, {2}]}})


def test_rng_state_roundtrip(tmp_path):
    state = roundtrip(ck.rng_state(), tmp_path)
    first = (random.random(), np.random.rand(), torch.rand(3))
    ck.set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def tiny_tied_mlm(seed):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=29, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=21, max_position_embeddings=16))


def test_save_load_keep_last(tmp_path):
    root = tmp_path / "ckpt"
    for step in (2, 4, 6, 8):
        model = tiny_tied_mlm(step)
        path = ck.save_checkpoint(root, step, model, {"step_state": {"k": torch.full((2,), step)}},
                                  {"lr": 0.1, "step": step}, keep_last=2)
        assert path.name == f"step_{step:08d}"
    assert [p.name for p in ck.checkpoint_dirs(root)] == ["step_00000006", "step_00000008"]
    assert sorted(os.listdir(root)) == ["step_00000006", "step_00000008"]  # nothing temporary left

    fresh = tiny_tied_mlm(99)
    loaded = ck.load_checkpoint(root, fresh)  # the root resolves to the latest
    assert loaded.step == 8 and loaded.config == {"lr": 0.1, "step": 8}
    assert torch.equal(loaded.state["step_state"]["k"], torch.full((2,), 8))
    expected = tiny_tied_mlm(8).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())
    assert fresh.cls.predictions.decoder.weight is fresh.bert.embeddings.word_embeddings.weight  # still tied

    assert ck.load_checkpoint(root / "step_00000006").step == 6
    ck.save_checkpoint(root, 6, tiny_tied_mlm(60), {}, {}, keep_last=3)  # re-saving a step replaces it
    assert ck.load_checkpoint(root / "step_00000006").state == {}


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        ck.load_checkpoint(tmp_path)
    path = ck.save_checkpoint(tmp_path, 1, torch.nn.Linear(3, 2), {}, {})
    with pytest.raises(ck.CheckpointError, match="do not fit the model"):
        ck.load_checkpoint(path, torch.nn.Linear(3, 4))
    (path / ck.STATE_FILE).write_text(json.dumps({"format": 999}))  # another version's, checksums consistent
    (path / ck.CHECKSUMS_FILE).write_text(json.dumps(file_checksums(path, list(json.loads(
        (path / ck.CHECKSUMS_FILE).read_text())))))
    with pytest.raises(ck.CheckpointError, match="format 999"):
        ck.load_checkpoint(path)
    with pytest.raises(ValueError, match="keep_last"):
        ck.save_checkpoint(tmp_path, 2, torch.nn.Linear(3, 2), {}, {}, keep_last=0)


def _flip_half_of_a_tensor(path):
    """Random floats over the second half of the largest tensor of a safetensors file, size unchanged."""
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    start, end = max((v["data_offsets"] for k, v in header.items() if k != "__metadata__"), key=lambda o: o[1] - o[0])
    base = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    data = bytearray(path.read_bytes())
    half = (start + end) // 2 // 4 * 4
    data[base + half:base + end] = np.random.default_rng(0).standard_normal((end - half) // 4, np.float32).tobytes()
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


DAMAGE = {  # what a disk, a copy or an editor can do to a finished checkpoint: (damage, the file it names)
    "weights overwritten": (lambda d: _flip_half_of_a_tensor(d / "model.safetensors"), "model.safetensors"),
    "weights truncated": (lambda d: os.truncate(d / "model.safetensors", 1000), "model.safetensors"),
    "state tensors missing": (lambda d: (d / "state.safetensors").unlink(), "state.safetensors"),
    "state.json truncated": (lambda d: os.truncate(d / "state.json", 10), "state.json"),
    "state.json edited": (lambda d: (d / "state.json").write_text((d / "state.json").read_text()
                                                                  .replace('"step": 2', '"step": 9')), "state.json"),
    "config edited": (lambda d: (d / "config.yaml").write_text("out_dir: /somewhere/else\n"), "config.yaml"),
    "checksums missing": (lambda d: (d / "checksums.json").unlink(), "checksums.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_is_named_and_the_previous_offered(tmp_path, damage):
    root = tmp_path / "ckpt"
    for step in (1, 2):
        ck.save_checkpoint(root, step, tiny_tied_mlm(step), {"x": torch.full((3,), step)}, {"run": 1})
    harm, named = DAMAGE[damage]
    harm(root / "step_00000002")
    for path in (root, root / "step_00000002"):  # the latest is never skipped silently
        with pytest.raises(ck.CheckpointError) as err:
            ck.load_checkpoint(path, tiny_tied_mlm(0))
        assert str(root / "step_00000002" / named) in str(err.value)
        assert (f"the newest complete one is {root / 'step_00000001'}" in str(err.value)) == (path == root)
    model = tiny_tied_mlm(0)  # the offered one loads, when asked for by name
    assert ck.load_checkpoint(root / "step_00000001", model).step == 1
    assert all(torch.equal(v, tiny_tied_mlm(1).state_dict()[k]) for k, v in model.state_dict().items())


KILLED_SAVER = textwrap.dedent("""
    import sys, time, pathlib, torch
    from trelm_fast import checkpoint as ck
    root, flag = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    ck.save_checkpoint(root, 1, model, {"x": torch.ones(3)}, {"run": 1})
    write = ck._write_text
    def write_then_hang(path, text):  # the second save stops half-way, with its tensors written
        write(path, text)
        if path.name == ck.STATE_FILE:
            flag.touch()
            time.sleep(120)
    ck._write_text = write_then_hang
    with torch.no_grad():
        model.weight.add_(1.0)
    ck.save_checkpoint(root, 2, model, {"x": torch.zeros(3)}, {"run": 1})
""")


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    root, flag = tmp_path / "ckpt", tmp_path / "hung"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(root), str(flag)])
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert proc.poll() is None, "saver exited early"
            assert time.time() < deadline, "saver never reached the middle of its second save"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(p.name.startswith(".tmp-step_00000002") for p in root.iterdir())  # the killed save's debris
    model = torch.nn.Linear(64, 64)
    loaded = ck.load_checkpoint(root, model)
    assert loaded.step == 1 and torch.equal(loaded.state["x"], torch.ones(3))
    torch.manual_seed(0)
    assert torch.equal(model.weight, torch.nn.Linear(64, 64).weight)
    ck.save_checkpoint(root, 3, model, {}, {})  # the next save clears the debris
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000003"]


def test_export_loads_with_auto_model(tmp_path):
    pytest.importorskip("trelm_fast.ffn")
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertTokenizer

    from trelm_fast.ffn import ffn_modules, swap_ffn
    mlm = tiny_tied_mlm(3).eval()
    swap_ffn(mlm)
    ids = torch.randint(0, 29, (2, 9))
    with torch.no_grad():
        expected = mlm(input_ids=ids).logits
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                          [f"w{i}" for i in range(24)])})
    out = ck.export_pretrained(mlm, tmp_path / "export", tok)
    assert len(ffn_modules(mlm)) == 2  # the training model stays swapped
    plain = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    assert all(not type(m).__module__.startswith("trelm_fast") for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_tied_mlm(0).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected)
    assert AutoTokenizer.from_pretrained(out, local_files_only=True)("w3 w7")["input_ids"] == [2, 8, 12, 3]
    ck.export_pretrained(mlm, out, tok)  # exporting again replaces the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
