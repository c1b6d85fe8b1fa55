"""The dense multi-LoRA math (eslora's `dense` SGLang LoRA backend) against a token-by-token
reference of what SGLang's LoRA kernels compute, on SGLang's buffer layouts, on CPU."""

from __future__ import annotations

import pytest
import torch

from eslora.backends.dense_lora import expand, shrink, slot_coefficients
from lora_reference import SLICE_CASES, make_case, reference_delta


@pytest.mark.parametrize("rank, offsets", SLICE_CASES)
def test_dense_matches_each_tokens_own_adapter(rank, offsets):
    x, a, b, token_slots, scalings, ranks = make_case(tokens=37, slots=5, rank=rank, in_dim=40, offsets=offsets)
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
    x, a, b, token_slots, scalings, ranks = make_case(tokens=64, slots=8, rank=1, in_dim=128, offsets=offsets,
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
    x, a, b, token_slots, scalings, ranks = make_case(tokens=4, slots=2, rank=2, in_dim=8, offsets=[0, 6, 12])
    z = shrink(x, a, slot_coefficients(token_slots, scalings, ranks))
    with pytest.raises(ValueError, match="4 columns per slot; 3 slices of rank 2 need 6"):
        expand(z, b, [0, 4, 8, 12])
