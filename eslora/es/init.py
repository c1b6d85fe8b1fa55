"""The initial ES mean of a LoRA adapter: B = 0, A ~ N(0, r / alpha^2), seeded per tensor.

Why not PEFT's own init? PEFT (Hu et al. 2021, "LoRA") draws A Kaiming-uniform and sets B = 0, so
the adapted model starts as the base model. We keep B = 0 for that reason, and choose A's scale
so that sigma means what it means in full-weight ES (Qiu et al. 2025, sigma = 1e-3):

- With B = 0, a member's weight change is (alpha/r) * (sigma*eps_B) @ (A + sigma*eps_A)
  = sigma * (alpha/r) * eps_B @ A + O(sigma^2). Noise on A alone changes nothing (B = 0 kills it);
  the search at generation 0 runs through B, and A's noise starts to count once B has moved.
- With A ~ N(0, r/alpha^2), each entry of sigma * (alpha/r) * eps_B @ A has variance exactly
  sigma^2: the same per-entry perturbation as full-weight ES with the same sigma, and the same
  form as EGGROLL's rank-r perturbation sigma/sqrt(r) * b a^T with Gaussian factors (Sarkar et
  al. 2025, "Evolution Strategies at the Hyperscale"), except that a is drawn once per run.
  So the anchors' sigma (1e-3) carries over unchanged; PEFT's Kaiming A (std 1/sqrt(3*in)) would
  shrink every perturbation by sqrt(3*in*r)/alpha, about 34x for a 1536-wide layer (r=1, alpha=2).

A's noise comes from the same counter-based generator as the perturbations (`member_noise`),
keyed by (init_seed, 0, "init/" + name): the "init/" prefix keeps it apart from generation noise.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from eslora.es.noise import member_noise


def init_lora_mean(
    shapes: Mapping[str, tuple[int, ...]], seed: int, *, alpha: float = 2.0, a_std: float | None = None
) -> dict[str, np.ndarray]:
    """fp32 mean adapter for PEFT tensor names -> shapes: lora_A ~ N(0, r/alpha^2), lora_B = 0.

    `alpha` is the adapter's lora_alpha (pass `cfg.lora.alpha`; 2.0 is LoraConfig's default);
    r is read from each lora_A's shape (r, in_features). `a_std` overrides A's std (None: the
    sqrt(r)/alpha above); a smaller A learns faster relative to B but shrinks B's perturbations.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if a_std is not None and not a_std > 0:
        raise ValueError(f"a_std must be > 0, got {a_std}")
    mean: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        shape = tuple(int(d) for d in shapes[name])
        if ".lora_A." in name:
            if len(shape) != 2:
                raise ValueError(f"{name}: expected a 2-D lora_A (r, in_features), got shape {shape}")
            std = math.sqrt(shape[0]) / alpha if a_std is None else float(a_std)
            mean[name] = (member_noise(seed, 0, "init/" + name, shape) * np.float32(std)).astype(np.float32)
        elif ".lora_B." in name:
            mean[name] = np.zeros(shape, np.float32)
        else:
            raise ValueError(f"{name}: not a LoRA tensor (names must contain '.lora_A.' or '.lora_B.')")
    if not mean:
        raise ValueError("no tensors to initialise")
    return mean
