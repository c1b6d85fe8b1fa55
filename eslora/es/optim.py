"""Optimizers for the ES mean: gradient *ascent* with SGD or Adam, decoupled weight decay.

- SGD: theta += lr * d, the update of Salimans et al. 2017 and of Qiu et al. 2025 (ES paper).
- Adam: Kingma & Ba 2015, bias-corrected, as OpenAI ES's `es_distributed/optimizers.py` uses it
  on the ES gradient estimate.
- Weight decay: decoupled (Loshchilov & Hutter 2019, AdamW): theta -= lr * wd * theta, applied to
  every tensor of the mean, after the gradient step is computed from the old theta.

Pure functions over dicts of arrays, written elementwise in float64 and rounded once to the fp32
master weights: every IEEE op used here is correctly rounded, so replicas on any machine produce
the same bytes. Tensors are visited in sorted-name order.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def sgd_step(mean: Arrays, direction: Arrays, *, lr: float, weight_decay: float) -> dict[str, np.ndarray]:
    """theta + lr * d - lr * wd * theta, rounded to fp32."""
    out = {}
    for name in sorted(mean):
        theta = mean[name].astype(np.float64)
        new = theta + lr * direction[name].astype(np.float64)
        if weight_decay:
            new -= (lr * weight_decay) * theta
        out[name] = new.astype(np.float32)
    return out


def adam_init(mean: Arrays) -> dict:
    """Zero moments (float64) and step 0."""
    return {
        "t": 0,
        "m": {name: np.zeros(mean[name].shape, np.float64) for name in sorted(mean)},
        "v": {name: np.zeros(mean[name].shape, np.float64) for name in sorted(mean)},
    }


def adam_step(
    mean: Arrays,
    direction: Arrays,
    state: Mapping,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple[dict[str, np.ndarray], dict]:
    """One Adam ascent step on `direction`; returns (new fp32 mean, new state). Inputs untouched."""
    t = int(state["t"]) + 1
    bias1 = 1.0 - beta1**t
    bias2 = 1.0 - beta2**t
    new_mean, new_m, new_v = {}, {}, {}
    for name in sorted(mean):
        g = direction[name].astype(np.float64)
        m = beta1 * state["m"][name] + (1.0 - beta1) * g
        v = beta2 * state["v"][name] + (1.0 - beta2) * (g * g)
        theta = mean[name].astype(np.float64)
        new = theta + lr * (m / bias1) / (np.sqrt(v / bias2) + eps)
        if weight_decay:
            new -= (lr * weight_decay) * theta
        new_mean[name], new_m[name], new_v[name] = new.astype(np.float32), m, v
    return new_mean, {"t": t, "m": new_m, "v": new_v}
