"""Quadrature rules on [0, 1] for the integrated-gradients integral of eq. 10.

`riemann`: alpha_k = k/m, w_k = 1/m (eq. 11 exactly). `gauss_legendre`: Gauss-Legendre nodes and
weights mapped to [0, 1], exact for polynomials of degree 2m - 1.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

QUADRATURES = ("riemann", "gauss_legendre")


def quadrature(m: int, rule: str = "riemann") -> tuple[Tensor, Tensor]:
    """(alphas [m], weights [m]) float64 for int_0^1 g(alpha) d alpha ~= sum_k w_k g(alpha_k)."""
    if m < 1:
        raise ValueError(f"routing.m must be >= 1, got {m}")
    if rule == "riemann":
        alphas = torch.arange(1, m + 1, dtype=torch.float64) / m
        return alphas, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "gauss_legendre":
        x, w = np.polynomial.legendre.leggauss(m)
        return torch.from_numpy((x + 1.0) / 2.0), torch.from_numpy(w / 2.0)
    raise ValueError(f"routing.quadrature must be one of {QUADRATURES}, got {rule!r}")
