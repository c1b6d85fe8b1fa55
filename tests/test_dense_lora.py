"""The dense multi-LoRA math (eslora's `dense` SGLang LoRA backend) against a token-by-token
reference of what SGLang's LoRA kernels compute, on SGLang's buffer layouts, on CPU."""

from __future__ import annotations

import pytest
import torch

from eslora.backends.dense_lora import expand, shrink, slot_coefficients


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


def _case(tokens: int, slots: int, rank: int, in_dim: int, offsets: list[int], dtype=torch.float32, seed: int = 0):
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


@pytest.mark.parametrize("rank, offsets", [
    (1, [0, 24]),                # o_proj / down_proj: one slice
    (1, [0, 16, 20, 24]),        # qkv: q, k, v of different widths
    (2, [0, 12, 24]),            # gate_up at rank 2
    (4, [0, 16, 20, 24]),
])
def test_dense_matches_each_tokens_own_adapter(rank, offsets):
    x, a, b, token_slots, scalings, ranks = _case(tokens=37, slots=5, rank=rank, in_dim=40, offsets=offsets)
    assert (token_slots == 4).any() and (token_slots != 4).any(), "the case needs base rows and adapter rows"
    base = torch.randn(37, offsets[-1])
    delta = reference_delta(x, a, b, token_slots, scalings, ranks, offsets)
    expected = base.double() + delta
    coefficients = slot_coefficients(token_slots, scalings, ranks)
    out = expand(shrink(x, a, coefficients), b, offsets, base_output=base)
    assert out is base, "the LoRA output is added into the base output in place, as SGLang's kernels do"
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    rows = token_slots == 4
    assert (delta[rows] == 0).all() and (delta[~rows] != 0).all()
    torch.testing.assert_close(out[rows].double(), expected[rows], rtol=0, atol=0)  # a base-model row: no LoRA at all
    fresh = expand(shrink(x, a, coefficients), b, offsets)  # no base output: the delta alone
    torch.testing.assert_close(fresh.double(), delta, rtol=1e-5, atol=1e-4)


def test_bf16_stays_close_to_the_float64_reference():
    offsets = [0, 64, 80, 96]
    x, a, b, token_slots, scalings, ranks = _case(tokens=64, slots=8, rank=1, in_dim=128, offsets=offsets,
                                                  dtype=torch.bfloat16, seed=3)
    out = expand(shrink(x, a, slot_coefficients(token_slots, scalings, ranks)), b, offsets)
    assert out.dtype == torch.bfloat16
    expected = reference_delta(x, a, b, token_slots, scalings, ranks, offsets)
    err = (out.double() - expected).abs().max() / expected.abs().max()
    assert err < 0.02, f"bf16 relative error {err:.4f}"


def test_coefficients_fill_a_static_buffer_in_place():
    """Under CUDA graphs the coefficients live in one buffer the captured kernels read: each
    forward rewrites its first rows, the rest (padding rows of a larger captured batch) is left."""
    buffer = torch.full((6, 4), 7.0)
    scalings, ranks = torch.tensor([2.0, 3.0, 4.0, 5.0]), torch.tensor([1, 1, 0, 1], dtype=torch.int32)
    rows = slot_coefficients(torch.tensor([1, 2, 0], dtype=torch.int32), scalings, ranks, out=buffer)
    assert rows.data_ptr() == buffer.data_ptr() and rows.shape == (3, 4)
    assert buffer[:3].tolist() == [[0, 3, 0, 0], [0, 0, 0, 0], [2, 0, 0, 0]]  # slot 2 is empty: nothing
    assert (buffer[3:] == 7.0).all()


def test_slices_must_match_the_rank():
    x, a, b, token_slots, scalings, ranks = _case(tokens=4, slots=2, rank=2, in_dim=8, offsets=[0, 6, 12])
    z = shrink(x, a, slot_coefficients(token_slots, scalings, ranks))
    with pytest.raises(ValueError, match="4 columns per slot; 3 slices of rank 2 need 6"):
        expand(z, b, [0, 4, 8, 12])
