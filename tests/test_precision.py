"""Mixed precision: config fields, bf16 autocast steps against fp32, the fp16 gradient scaler over
dense and slice gradients (skip, update, resume), slice gradients under autocast, TF32 switch."""
import copy
import math

import pytest
import torch

from test_ffn import D, I, L, MODELS, _loss, _pair, _rel
from test_model import make_batch, setup_step, tiny_config
from trelm_fast.config import ConfigError, load_config
from trelm_fast.ffn import ffn_modules
from trelm_fast.precision import MixedPrecision, ieee_fp32, resolve_precision, set_tf32
from trelm_fast.step import build_step_model, make_step


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _tensors(tree):
    """Every tensor of a nested state (dicts/lists), in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in tree for t in _tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def _slice_state(step):
    return [t.clone() for t in _tensors(step.optimizer.slice_state)]


# ---------------------------------------------------------------------------------------------
# configuration and resolution


def test_config_fields_defaults_and_errors():
    cfg = load_config()
    assert cfg.train.precision == "auto" and cfg.train.tf32 is True
    cfg = load_config(None, ["train.precision=fp16", "train.tf32=false"])
    assert cfg.train.precision == "fp16" and cfg.train.tf32 is False
    with pytest.raises(ConfigError, match=r"train\.precision must be one of auto, fp32, bf16, fp16, got 'half'"):
        load_config(None, ["train.precision=half"])
    with pytest.raises(ConfigError, match=r"train\.tf32 must be bool"):
        load_config(None, ["train.tf32=maybe"])


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"  # auto is bf16 on CUDA only
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("fp8", cpu)
    mp = MixedPrecision("bf16", cpu)
    assert mp.dtype is torch.bfloat16 and mp.scaler is None and mp.attribution_dtype is torch.bfloat16
    mp = MixedPrecision("fp16", cpu)
    assert mp.dtype is torch.float16 and mp.scaler is not None and mp.attribution_dtype is None


def test_tf32_switch_only_on_cuda():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        set_tf32(torch.device("cuda"), True)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(torch.device("cpu"), False)  # no effect on CPU
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(torch.device("cuda"), False)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


# ---------------------------------------------------------------------------------------------
# bf16 autocast steps


@pytest.mark.parametrize("method", ["trelm", "dense_opt"])
def test_bf16_step_is_close_to_fp32_and_keeps_fp32_state(method, dataset):
    m32, s32 = setup_step(method, dataset, "train.precision=fp32")[1:]
    m16, s16 = setup_step(method, dataset, "train.precision=bf16")[1:]
    assert all(torch.equal(a, b) for a, b in zip(_params(m32).values(), _params(m16).values()))
    for i in range(3):  # step 2 refreshes the paths (routing.refresh=2): attribution under bf16
        r32, r16 = s32(make_batch(seed=i), i), s16(make_batch(seed=i), i)
        assert not r16.skipped_nonfinite and math.isfinite(r16.loss)
        assert float(r16.loss) != float(r32.loss)  # autocast really ran
        assert float(r16.loss) == pytest.approx(float(r32.loss), rel=2e-2), i
        assert "amp/scale" not in r16.stats
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    dense_state = _tensors(s16.optimizer.dense.state_dict()["state"])
    assert dense_state and all(t.dtype == torch.float32 for t in dense_state if t.is_floating_point())
    if method == "trelm":
        assert s16.router.autocast is torch.bfloat16 and s32.router.autocast is None
        slices = [t for t in _tensors(s16.optimizer.slice_state) if t.is_floating_point()]
        assert slices and all(t.dtype == torch.float32 for t in slices)
        assert m16.bank.local.dtype == torch.float32
        torch.testing.assert_close(m16.bank.local, m32.bank.local, atol=2e-2, rtol=2e-2)


def test_trelm_naive_attributes_under_bf16(dataset):
    model, step = setup_step("trelm_naive", dataset, "train.precision=bf16")[1:]
    r = step(make_batch(seed=0), 0)
    assert not r.skipped_nonfinite and math.isfinite(r.loss)
    assert step.router.autocast is torch.bfloat16 and "time/attribution_s" in r.stats
    assert all(p.numel() > 0 for p in step.paths)


@pytest.mark.parametrize("bank_dtype", ["float32", "bfloat16"])
def test_bank_keeps_its_dtype_for_bf16_hidden_states(bank_dtype, dataset):
    (model, _), (other, _) = (setup_step("trelm", dataset, f"kmb.dtype={bank_dtype}")[1:] for _ in range(2))
    before = model.bank.local.clone()
    batch = make_batch(seed=3)
    hidden = torch.randn(*batch["input_ids"].shape, 32, generator=torch.Generator().manual_seed(0))
    model.update_bank(hidden.bfloat16(), batch)
    other.update_bank(hidden.bfloat16().float(), batch)  # the same values in fp32
    dtype = getattr(torch, bank_dtype)
    assert model.bank.local.dtype == dtype and model.bank.global_mean.dtype == dtype
    assert not torch.equal(model.bank.local, before)
    assert torch.equal(model.bank.local, other.bank.local)
    assert torch.equal(model.bank.global_mean, other.bank.global_mean)


@pytest.mark.parametrize("model_cls,cfg_cls", MODELS[:2])
def test_slice_grads_under_bf16_autocast_match_dense(model_cls, cfg_cls):
    ref, swapped = _pair(model_cls, cfg_cls, seed=3)
    ref.train(), swapped.train()
    g = torch.Generator().manual_seed(3)
    paths = [torch.randperm(I, generator=g)[:9].sort().values for _ in range(L)]
    for f, p in zip(ffn_modules(swapped), paths):
        f.set_path(p)
    emb = torch.randn(3, 9, D, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lr, ls = _loss(ref, None, embeds=emb), _loss(swapped, None, embeds=emb)
    assert torch.equal(lr, ls)
    lr.backward(), ls.backward()
    for f, layer, p in zip(ffn_modules(swapped), ref.base_model.encoder.layer, paths):
        s, w1, w2 = f.slices, layer.intermediate.dense, layer.output.dense
        assert all(t.grad.dtype == torch.float32 for t in s)
        # the dense autocast backward rounds its weight gradients to bf16; the slices accumulate in fp32
        assert _rel(s.w1.grad, w1.weight.grad[p]) <= 1e-2
        assert _rel(s.b1.grad, w1.bias.grad[p]) <= 1e-2
        assert _rel(s.w2.grad, w2.weight.grad[:, p]) <= 1e-2
        assert _rel(f.down.bias.grad, w2.bias.grad) <= 1e-2


# ---------------------------------------------------------------------------------------------
# fp16 and the gradient scaler


def _inf_hook(grad):
    return torch.full_like(grad, float("inf"))


@pytest.mark.parametrize("where", ["dense", "slice"])
def test_fp16_scaler_skips_an_overflowing_step_everywhere(where, dataset):
    model, step = setup_step("trelm", dataset, "train.precision=fp16")[1:]
    r0 = step(make_batch(seed=0), 0)  # sets the paths (the next refresh is at step 2)
    assert r0.stats["amp/skipped"] == 0 and r0.stats["amp/scale"] == 2.0 ** 16
    f = ffn_modules(model.mlm)[0]
    target = model.mlm.cls.predictions.bias if where == "dense" else f.slices.w1
    handle = target.register_hook(_inf_hook)
    params, slices, paths = _params(model), _slice_state(step), [p.clone() for p in step.paths]
    dense_state = [t.clone() for t in _tensors(step.optimizer.dense.state_dict())]
    r = step(make_batch(seed=1), 1)
    handle.remove()
    assert not r.skipped_nonfinite and math.isfinite(r.loss) and step.nonfinite_total == 0
    assert r.stats["amp/skipped"] == 1 and r.stats["amp/skipped_total"] == 1
    assert r.stats["amp/scale"] == 2.0 ** 15  # backed off
    after = _params(model)
    assert all(torch.equal(params[n], after[n]) for n in params), "a parameter changed"
    assert all(torch.equal(a, b) for a, b in zip(slices, _slice_state(step))), "slice state changed"
    assert all(torch.equal(a, b) for a, b in zip(dense_state, _tensors(step.optimizer.dense.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(paths, step.paths))
    assert all(t.grad is None for t in f.slices) and all(p.grad is None for p in model.parameters())
    # the next step is normal again: it updates the dense and the slice parameters
    r2 = step(make_batch(seed=1), 1)
    assert r2.stats["amp/skipped"] == 0 and r2.stats["amp/scale"] == 2.0 ** 15
    after2 = _params(model)
    assert not torch.equal(after2["mlm.cls.predictions.bias"], after["mlm.cls.predictions.bias"])
    w1 = "mlm.bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(after2[w1][f.path], after[w1][f.path])
    assert torch.equal(step.optimizer.slice_state[0]["step"][f.path], torch.full_like(f.path, 2))


def test_fp16_step_is_close_to_fp32_and_nonfinite_loss_is_not_a_scaler_skip(dataset):
    m32, s32 = setup_step("trelm", dataset, "train.precision=fp32")[1:]
    m16, s16 = setup_step("trelm", dataset, "train.precision=fp16")[1:]
    r32, r16 = s32(make_batch(seed=0), 0), s16(make_batch(seed=0), 0)
    assert float(r16.loss) != float(r32.loss) and float(r16.loss) == pytest.approx(float(r32.loss), rel=1e-2)
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    assert all(t.dtype == torch.float32 for t in _tensors(s16.optimizer.slice_state) if t.is_floating_point())
    with torch.no_grad():
        m16.mlm.cls.predictions.bias.fill_(float("nan"))
    r = s16(make_batch(seed=1), 1)
    assert r.skipped_nonfinite and s16.nonfinite_total == 1
    assert s16.precision.skipped_total == 0 and s16.precision.scaler.get_scale() == 2.0 ** 16


def test_fp16_scaler_state_round_trips_for_an_exact_resume(dataset):
    model, step = setup_step("trelm", dataset, "train.precision=fp16")[1:]
    step(make_batch(seed=0), 0)
    handle = model.mlm.cls.predictions.bias.register_hook(_inf_hook)
    step(make_batch(seed=1), 1)  # skipped: scale 2^15, one skip counted
    handle.remove()
    step(make_batch(seed=1), 1)  # growth tracker 1
    state = copy.deepcopy(step.state_dict())  # what a checkpoint writes: a copy, not live tensors
    params, bank = copy.deepcopy(model.state_dict()), copy.deepcopy(model.bank.state_dict())
    assert state["precision"]["grad_scaler"]["scale"] == 2.0 ** 15
    assert state["precision"]["grad_scaler"]["_growth_tracker"] == 1
    runs = []
    for resumed in (False, True):
        if resumed:  # a fresh model and step (fresh scaler at 2^16) loaded from the copies
            model, step = setup_step("trelm", dataset, "train.precision=fp16")[1:]
            model.load_state_dict(params)
            model.bank.load_state_dict(bank)
            step.load_state_dict(state)
        results = [step(make_batch(seed=i), i) for i in (2, 3)]  # step 2 refreshes the paths
        runs.append(([(float(r.loss), r.stats["amp/scale"], r.stats["amp/skipped_total"]) for r in results],
                     _params(model), _slice_state(step), step.precision.scaler.state_dict()))
    (res_a, p_a, sl_a, sc_a), (res_b, p_b, sl_b, sc_b) = runs
    assert res_a == res_b and [r[1:] for r in res_a] == [(2.0 ** 15, 1)] * 2
    assert sc_a == sc_b and sc_a["_growth_tracker"] == 3
    assert all(torch.equal(p_a[n], p_b[n]) for n in p_a)
    assert all(torch.equal(a, b) for a, b in zip(sl_a, sl_b))


@pytest.mark.cuda
def test_precisions_on_cuda(dataset):
    losses = {}
    for precision in ("auto", "fp32", "fp16"):
        cfg = tiny_config(f"train.precision={precision}")
        torch.manual_seed(0)
        model = build_step_model("trelm", cfg, dataset, device="cuda")
        step = make_step("trelm", model, cfg)
        results = [step(make_batch(seed=i), i) for i in range(3)]
        assert all(not r.skipped_nonfinite and math.isfinite(r.loss) for r in results)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses[step.precision.name] = float(results[0].loss)
    assert set(losses) == {"bf16", "fp32", "fp16"}  # auto: bf16 on CUDA
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=1e-2)


def test_trainer_logs_and_checkpoints_the_fp16_scaler(tmp_path, tiny_dir):
    from test_train import TINY, metrics

    from trelm_fast import train as train_mod
    from trelm_fast.checkpoint import load_checkpoint

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = train_mod.main(TINY + [f"data.dir={tiny_dir}", f"out_dir={out}", "train.steps=2",
                                      "train.precision=fp16"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    m = metrics(out)
    assert [m[s]["amp/scale"] for s in (1, 2)] == [2.0 ** 16] * 2 and m[2]["amp/skipped_total"] == 0
    ck = load_checkpoint(out / "checkpoints")
    assert ck.config["train"]["precision"] == "fp16"
    scaler = ck.state["step"]["precision"]["grad_scaler"]
    assert scaler["scale"] == 2.0 ** 16 and scaler["_growth_tracker"] == 2


def test_ieee_fp32_forces_and_restores_the_mode():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        set_tf32(torch.device("cuda"), True)
        with ieee_fp32():
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
