"""The multi-LoRA reference eslora's SGLang LoRA backends are tested against
(tests/test_dense_lora.py, tests/test_gathered_lora.py, tests/test_fused_lora.py): what SGLang's LoRA kernels compute, token
by token in float64, on SGLang 0.5.17's buffer layouts (A (S, c * R, K), B (S, N, R))."""

from __future__ import annotations

import torch

# (rank, slice offsets) every backend's test covers: a module's slices as SGLang's buffers hold them
SLICE_CASES = [
    (1, [0, 24]),                # o_proj / down_proj: one slice
    (1, [0, 16, 20, 24]),        # qkv: q, k, v of different widths
    (2, [0, 12, 24]),            # gate_up at rank 2
    (4, [0, 16, 20, 24]),
]


def reference_delta(x, a_weights, b_weights, token_slots, scalings, ranks, offsets):
    """Token t's LoRA output in float64: scaling * B_i (A_i x_t) per slice i, with its own slot's
    weights (SGLang's per-segment kernels); zero for a slot of rank 0."""
    rank = b_weights.shape[-1]
    out = torch.zeros(x.shape[0], b_weights.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if int(ranks[s]) == 0:
            continue
        for i in range(len(offsets) - 1):
            lo, hi = offsets[i], offsets[i + 1]
            a = a_weights[s, i * rank:(i + 1) * rank].double()
            out[t, lo:hi] = float(scalings[s]) * (b_weights[s, lo:hi].double() @ (a @ x[t].double()))
    return out


def make_case(tokens: int, slots: int, rank: int, in_dim: int, offsets: list[int], dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    stacked = len(offsets) - 1
    x = torch.randn(tokens, in_dim, generator=g).to(dtype)
    a = torch.randn(slots, stacked * rank, in_dim, generator=g).to(dtype)
    b = torch.randn(slots, offsets[-1], rank, generator=g).to(dtype)
    token_slots = torch.randint(0, slots, (tokens,), generator=g, dtype=torch.int32)
    scalings = torch.rand(slots, generator=g) + 0.5
    ranks = torch.full((slots,), rank, dtype=torch.int32)
    ranks[slots - 1] = 0  # an empty slot (the base model's requests)
    return x, a, b, token_slots, scalings, ranks
