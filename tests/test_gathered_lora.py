"""The gathered multi-LoRA kernels (eslora's `gathered` SGLang LoRA backend) against a token-by-token
reference of what SGLang's LoRA kernels compute, on SGLang's buffer layouts. Without a GPU the
Triton kernels run in Triton's interpreter (the real kernels' code, executed in numpy)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, at import

pytest.importorskip("triton")  # a test dependency on Linux x86-64 (pyproject.toml)
from eslora.backends.gathered_lora import expand, shrink, slot_scales  # noqa: E402
from lora_reference import SLICE_CASES, make_case, reference_delta  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(x, a, b, token_slots, scalings, ranks, offsets, base=None):
    scales = slot_scales(scalings.to(DEVICE), ranks.to(DEVICE))
    slots = token_slots.to(DEVICE)
    z = shrink(x.to(DEVICE), a.to(DEVICE), slots, scales)
    return z, expand(z, b.to(DEVICE), offsets, slots, scales, base)


@pytest.mark.parametrize("rank, offsets", SLICE_CASES + [
    (1, [0, 130, 150, 300]),     # slices that cross the kernel's column blocks
])
def test_gathered_matches_each_tokens_own_adapter(rank, offsets):
    # 37 tokens, K of 600: several token blocks and loop steps over K, both with a ragged end
    x, a, b, token_slots, scalings, ranks = make_case(tokens=37, slots=5, rank=rank, in_dim=600, offsets=offsets)
    assert (token_slots == 4).any() and (token_slots != 4).any(), "the case needs base rows and adapter rows"
    base = torch.randn(37, offsets[-1]).to(DEVICE)
    delta = reference_delta(x, a, b, token_slots, scalings, ranks, offsets)
    expected = base.double().cpu() + delta
    before = base.clone()
    z, out = run(x, a, b, token_slots, scalings, ranks, offsets, base)
    assert out is base, "the LoRA output is added into the base output in place, as SGLang's kernels do"
    assert z.shape == (37, rank * (len(offsets) - 1)) and z.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-3)
    rows = (token_slots == 4).to(DEVICE)
    assert (delta[rows.cpu()] == 0).all() and (delta[~rows.cpu()] != 0).all()
    assert torch.equal(out[rows], before[rows]), "a base-model row gets no LoRA at all, bit for bit"
    _, fresh = run(x, a, b, token_slots, scalings, ranks, offsets)  # no base output: the delta alone
    torch.testing.assert_close(fresh.double().cpu(), delta, rtol=1e-5, atol=1e-3)


def test_bf16_stays_close_to_the_float64_reference():
    offsets = [0, 64, 80, 96]
    x, a, b, token_slots, scalings, ranks = make_case(tokens=64, slots=8, rank=1, in_dim=128, offsets=offsets,
                                                      dtype=torch.bfloat16, seed=3)
    _, out = run(x, a, b, token_slots, scalings, ranks, offsets)
    assert out.dtype == torch.bfloat16
    expected = reference_delta(x, a, b, token_slots, scalings, ranks, offsets)
    err = (out.double().cpu() - expected).abs().max() / expected.abs().max()
    assert err < 0.01, f"bf16 relative error {err:.4f}"


def test_an_empty_slots_weights_are_never_read():
    """A slot without an adapter may hold anything (SGLang reuses freed slots): its rows read no
    weights, so even NaN there leaves the base-model rows as they were and touches no other row."""
    offsets = [0, 16, 32]
    x, a, b, token_slots, scalings, ranks = make_case(tokens=20, slots=3, rank=1, in_dim=32, offsets=offsets)
    a[2], b[2] = float("nan"), float("nan")  # slot 2 has rank 0
    base = torch.randn(20, 32).to(DEVICE)
    before = base.clone()
    z, out = run(x, a, b, token_slots, scalings, ranks, offsets, base)
    rows = (token_slots == 2).to(DEVICE)
    assert rows.any() and not torch.isnan(out).any() and not torch.isnan(z).any()
    assert torch.equal(out[rows], before[rows]) and (z[rows] == 0).all()


def test_slot_scales_fill_a_static_buffer_in_place():
    """Under CUDA graphs the per-slot scales live in one buffer the captured kernels read."""
    buffer = torch.full((3,), 7.0)
    scalings, ranks = torch.tensor([2.0, 3.0, 4.0, 5.0]), torch.tensor([1, 0, 1, 1], dtype=torch.int32)
    scales = slot_scales(scalings, ranks, out=buffer)
    assert scales.data_ptr() == buffer.data_ptr() and buffer.tolist() == [2.0, 0.0, 4.0]
    assert slot_scales(scalings, ranks).tolist() == [2.0, 0.0, 4.0, 5.0]


def test_no_tokens():
    x, a, b, token_slots, scalings, ranks = make_case(tokens=0, slots=2, rank=1, in_dim=8, offsets=[0, 8])
    z, out = run(x, a, b, token_slots, scalings, ranks, [0, 8])
    assert z.shape == (0, 1) and out.shape == (0, 8)


def test_bad_slices_are_refused():
    x, a, b, token_slots, scalings, ranks = make_case(tokens=4, slots=2, rank=2, in_dim=8, offsets=[0, 6, 12])
    z, _ = run(x, a, b, token_slots, scalings, ranks, [0, 6, 12])
    scales, slots = slot_scales(scalings, ranks).to(DEVICE), token_slots.to(DEVICE)
    with pytest.raises(ValueError, match="4 columns; 3 slices of rank 2 need 6"):
        expand(z, b.to(DEVICE), [0, 4, 8, 12], slots, scales)
    with pytest.raises(ValueError, match=r"slice offsets \[0, 6, 10\] must run from 0 to the B buffer's 12 columns"):
        expand(z, b.to(DEVICE), [0, 6, 10], slots, scales)
