"""Configuration: embedded default, YAML files, dotted overrides, validation errors."""
import json

import pytest

from trelm_fast.config import (
    Config, ConfigError, config_from_dict, load_config, parse_overrides, resolve_model_path,
)
from trelm_fast.data.base_model import load_tokenizer, tokenizer_identity
from trelm_fast.data.build import FORMAT_VERSION


def test_default_loads_and_round_trips(tmp_path):
    cfg = load_config()
    assert cfg.method.name == "trelm" and cfg.loss.theta == 0.5 and cfg.model.init == "auto"
    cfg.dump(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg == Config()  # the embedded YAML and the dataclass defaults say the same


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\nkmb:\n  beta: 3\n")
    cfg = load_config(f, ["--train.steps", "11", "method.name=dense", "--routing.layers=[0, 2]",
                          "--optim.lr", "2e-4", "--model.num_layers", "null"])
    assert cfg.train.steps == 11
    assert cfg.kmb.beta == 3.0 and isinstance(cfg.kmb.beta, float)
    assert cfg.method.name == "dense"
    assert cfg.routing.layers == [0, 2]
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.model.num_layers is None
    assert cfg.train.batch_size == Config().train.batch_size  # untouched keys keep defaults


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "c.d=x", "--e.f=true"]) == {
        "a": {"b": 1}, "c": {"d": "x"}, "e": {"f": True}}
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_overrides(["oops"])


@pytest.mark.parametrize("override, field", [
    ("loss.theta=1.5", "loss.theta"),
    ("loss.theta=-0.1", "loss.theta"),
    ("kmb.gamma=0", "kmb.gamma"),
    ("kmb.gamma=1", "kmb.gamma"),
    ("kmb.beta=0.5", "kmb.beta"),
    ("routing.m=0", "routing.m"),
    ("optim.slice_lr_scale=0", "optim.slice_lr_scale"),
    ("routing.fraction=0", "routing.fraction"),
    ("routing.fraction=1.2", "routing.fraction"),
    ("method.name=magic", "method.name"),
    ("train.steps=-1", "train.steps"),  # 0 is allowed: probe and export the start
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("train.resume=/no/such/dir", "train.resume"),
    ("model.path=/no/such/model", "model.path"),
    ("routing.layers=[-1]", "routing.layers"),
    ("train.stepz=3", "train.stepz"),
    ("device=tpu", "device"),
    ("method.trainable=[everything]", "method.trainable"),
])
def test_validation_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_boundary_values_accepted():
    cfg = load_config(None, ["loss.theta=0", "kmb.beta=1", "routing.fraction=1", "routing.m=1"])
    assert cfg.loss.theta == 0.0 and cfg.routing.fraction == 1.0


def test_bad_yaml_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    f.write_bytes(b"seed: 1\nout_dir: r\xffn\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not UTF-8: byte 0xff at byte 19 of the file"):
        load_config(f)


def _dataset_dir(tmp_path, tokenizer):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "tokenizer": tokenizer, "files": {}, "seq_len": 32}))
    return d


def test_dataset_for_same_tokenizer_accepted(tmp_path):
    ident = {**tokenizer_identity(load_tokenizer(str(resolve_model_path("minilm")))), "mask_id": 103}
    d = _dataset_dir(tmp_path, ident)
    cfg = load_config(None, [f"data.dir={d}"])
    assert cfg.data.dir == str(d)


def test_dataset_for_other_tokenizer_rejected(tmp_path):
    d = _dataset_dir(tmp_path, {"vocab_size": 50265, "vocab_sha256": "0" * 64, "lowercase": False})
    with pytest.raises(ConfigError, match="another tokenizer"):
        load_config(None, [f"data.dir={d}"])


def test_dataset_without_manifest_rejected(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="no manifest"):
        load_config(None, [f"data.dir={tmp_path / 'half'}"])


def test_a_named_data_dir_is_built_only_when_asked(tmp_path):
    assert load_config().data.build  # the embedded default builds its own data_cache/synthetic
    assert not load_config(None, [f"data.dir={tmp_path / 'mine'}"]).data.build
    assert load_config(None, [f"data.dir={tmp_path / 'mine'}", "data.build=true"]).data.build
    named = tmp_path / "named.yaml"
    named.write_text(f"data:\n  dir: {tmp_path / 'mine'}\n")
    assert not load_config(named).data.build
