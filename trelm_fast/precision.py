"""Mixed precision of the training step: autocast dtype, fp16 loss scaling, TF32.

`train.precision` (config.PRECISIONS):

| precision | forward + loss            | backward                    | loss scaling            |
|-----------|---------------------------|-----------------------------|-------------------------|
| `fp32`    | fp32                      | fp32                        | none                    |
| `bf16`    | torch.autocast(bfloat16)  | outside autocast (as usual) | none                    |
| `fp16`    | torch.autocast(float16)   | outside autocast            | torch.amp.GradScaler    |
| `auto`    | `bf16` on CUDA with bf16 support, else `fp32` (the CPU)                            |

Parameters, gradients (dense and path slices) and optimizer state stay fp32 in every mode. The
attribution of the knowledge paths runs its scaled copies under bf16 autocast when the precision is
bf16, in fp32 otherwise (fp16 would need its own loss scaling: dP/dv of a probability can
underflow).

fp16 loss scaling: backward of S * loss; then `step(optimizer)` unscales the dense gradients and
the knowledge-path slice gradients together (`TrelmOptimizer` is no torch optimizer, so the scaler
sees both through `_ScalerView`), clips them when `train.max_grad_norm` > 0, runs the optimizer
only if all of them are finite, and updates S (halved after an overflow, doubled after 2000 clean
steps: the GradScaler defaults).

`set_tf32(device, enabled)`: TF32 for fp32 matmuls and cuDNN convolutions, process-wide, on CUDA;
nothing on CPU.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from trelm_fast.config import PRECISIONS

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> `bf16` on a CUDA device that supports it, else `fp32`; other names unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device_type: str, dtype: torch.dtype | None):
    """torch.autocast(device_type, dtype), or a no-op context for dtype None (fp32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """Allow (or forbid) TF32 for fp32 matmuls and cuDNN convolutions when ``device`` is CUDA."""
    if device.type != "cuda":
        return
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


@contextlib.contextmanager
def ieee_fp32():
    """Within: fp32 matmuls and cuDNN convolutions in full IEEE fp32 (no TF32); the modes before are
    restored after. Uses the `fp32_precision` API only, as `set_tf32` does: torch refuses to read the
    legacy `allow_tf32` flags once the new API has set them."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


class _ScalerView:
    """What torch.amp.GradScaler needs of an optimizer, for a TrelmOptimizer: ``param_groups`` over
    the dense parameters and the slice leaves (their grads are unscaled and checked together) and
    ``step()``, which the scaler calls only when every one of those gradients is finite."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.param_groups = [{"params": optimizer.trained_tensors()}]
        self.stepped = False

    def has_grads(self) -> bool:
        return any(p.grad is not None for p in self.param_groups[0]["params"])

    def step(self) -> None:
        self.optimizer.step()
        self.stepped = True


def clip_grad_norm(optimizer, max_norm: float) -> Tensor | None:
    """Clip the global L2 norm of ``optimizer.trained_tensors()``' gradients (dense and slices together)
    to ``max_norm`` (torch.nn.utils.clip_grad_norm_); returns the norm before clipping (a tensor, no
    host sync), or None when ``max_norm`` is 0 (no clipping)."""
    if max_norm <= 0:
        return None
    grads = [t for t in optimizer.trained_tensors() if t.grad is not None]
    return torch.nn.utils.clip_grad_norm_(grads, max_norm) if grads else None


class MixedPrecision:
    """The precision of one TrainStep on ``device``: ``autocast()`` for the forward and loss,
    ``backward(loss)``, ``step(optimizer)``; ``state_dict()`` holds the loss scaler's state."""

    def __init__(self, precision: str, device: torch.device):
        self.name = resolve_precision(precision, device)
        self.dtype = _DTYPES[self.name]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if self.name == "fp16" else None
        self.skipped_total = 0  # optimizer steps the scaler skipped (gradient overflow)

    @property
    def attribution_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the path attribution: bfloat16 under bf16, else None (fp32)."""
        return torch.bfloat16 if self.name == "bf16" else None

    def autocast(self):
        """The forward's context: torch.autocast at the step's dtype (a no-op for fp32)."""
        return autocast(self.device_type, self.dtype)

    def backward(self, loss: Tensor) -> None:
        """loss.backward(), of the scaled loss under fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer, skip: Tensor | None = None, max_grad_norm: float = 0.0) -> tuple[bool, Tensor | None]:
        """Apply the gradients with ``optimizer`` (a TrelmOptimizer), clipped to ``max_grad_norm`` when
        > 0 (`clip_grad_norm`); returns (False if the scaler skipped the update, the norm before
        clipping or None).

        fp32/bf16: ``optimizer.step(skip)`` (``skip``: a bool scalar tensor, read on the device).
        fp16: unscale dense and slice gradients, clip, step unless any is inf/NaN, update the scale.
        """
        if self.scaler is None:
            norm = clip_grad_norm(optimizer, max_grad_norm)
            optimizer.step(skip)
            return True, norm
        view = _ScalerView(optimizer)
        if not view.has_grads():  # nothing to apply (and the scaler needs a gradient to check)
            return True, None
        self.scaler.unscale_(view)
        norm = clip_grad_norm(optimizer, max_grad_norm)
        self.scaler.step(view)  # view.step() unless a gradient is inf/NaN (already unscaled)
        self.scaler.update()
        if not view.stepped:
            self.skipped_total += 1
        return view.stepped, norm

    def stats(self, stepped: bool) -> dict:
        """``amp/scale``, ``amp/skipped`` (this step), ``amp/skipped_total`` under fp16; else empty."""
        if self.scaler is None:
            return {}
        return {"amp/scale": self.scaler.get_scale(), "amp/skipped": int(not stepped),
                "amp/skipped_total": self.skipped_total}

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total,
                "grad_scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the skip count and the scaler (an fp16 run resuming a state without one starts fresh)."""
        self.skipped_total = int(state["skipped_total"])
        if self.scaler is not None and state["grad_scaler"] is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
