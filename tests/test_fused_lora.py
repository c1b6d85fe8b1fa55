"""The fused multi-LoRA math (eslora's `fused` SGLang LoRA backend: the LoRA inside the base GEMM)
against a token-by-token reference of what SGLang's LoRA kernels compute, on SGLang's buffer
layouts. Without a GPU the Triton kernel runs in Triton's interpreter (the real kernel's code,
executed in numpy)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, at import

pytest.importorskip("triton")  # a test dependency on Linux x86-64 (pyproject.toml)
from eslora.backends.fused_lora import (  # noqa: E402
    COLUMN_MULTIPLE, extend_weight, extra_columns, fused_input, linear, write_slot)
from eslora.backends.gathered_lora import slot_scales  # noqa: E402
from lora_reference import SLICE_CASES, make_case, reference_delta  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def extended_for(weight, b, offsets):
    """The extended weight with every slot's B written, as the plugin does when SGLang loads slots."""
    slots, stacked = b.shape[0], b.shape[-1] * (len(offsets) - 1)
    extended = extend_weight(weight.to(DEVICE), slots, stacked)
    for slot in range(slots):
        write_slot(extended, weight.shape[1], b.to(DEVICE), slot, offsets)
    return extended


@pytest.mark.parametrize("rank, offsets", SLICE_CASES)
def test_fused_linear_is_the_base_projection_plus_each_tokens_own_adapter(rank, offsets):
    # 37 tokens, K of 600: several token blocks and loop steps over K, both with a ragged end
    x, a, b, token_slots, scalings, ranks = make_case(tokens=37, slots=5, rank=rank, in_dim=600, offsets=offsets)
    assert (token_slots == 4).any() and (token_slots != 4).any(), "the case needs base rows and adapter rows"
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(offsets[-1], 600, generator=g), torch.randn(offsets[-1], generator=g)
    scales = slot_scales(scalings.to(DEVICE), ranks.to(DEVICE))
    extended = extended_for(weight, b, offsets)
    out = linear(x.to(DEVICE), extended, bias.to(DEVICE), a.to(DEVICE), token_slots.to(DEVICE), scales)
    base = x.double() @ weight.double().T + bias.double()
    delta = reference_delta(x, a, b, token_slots, scalings, ranks, offsets)
    assert (delta[token_slots != 4] != 0).all(), "every adapter row's output moves"
    torch.testing.assert_close(out.double().cpu(), base + delta, rtol=1e-5, atol=1e-3)
    rows = token_slots == 4
    torch.testing.assert_close(out.double().cpu()[rows], base[rows], rtol=1e-5, atol=1e-3)


def test_the_gemms_input_holds_x_and_only_the_own_slots_products():
    offsets = [0, 16, 20, 24]
    x, a, _, token_slots, scalings, ranks = make_case(tokens=19, slots=4, rank=2, in_dim=40, offsets=offsets)
    scales = slot_scales(scalings, ranks)
    extra = extra_columns(4, 6)
    xz = fused_input(x.to(DEVICE), a.to(DEVICE), token_slots.to(DEVICE), scales.to(DEVICE), extra).cpu()
    assert xz.shape == (19, 40 + extra) and extra % COLUMN_MULTIPLE == 0 and extra >= 24
    assert torch.equal(xz[:, :40], x), "x is copied bit for bit"
    for t in range(19):
        s = int(token_slots[t])
        z = xz[t, 40:]
        own = z[s * 6:(s + 1) * 6]
        expected = float(scales[s]) * (a[s].double() @ x[t].double())
        torch.testing.assert_close(own.double(), expected, rtol=1e-5, atol=1e-5)
        assert (torch.cat([z[:s * 6], z[(s + 1) * 6:]]) == 0).all(), f"token {t}: other slots' columns are zero"


def test_rewriting_a_slot_replaces_its_adapter_and_leaves_the_others():
    """SGLang reuses slots: a slot's columns take the newly loaded adapter's B, whole."""
    offsets = [0, 8, 16]
    x, a, b, token_slots, scalings, ranks = make_case(tokens=12, slots=3, rank=1, in_dim=16, offsets=offsets)
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    extended = extended_for(weight, b, offsets)
    before = extended.clone()
    b2 = b.clone()
    b2[1] = torch.randn(16, 1, generator=torch.Generator().manual_seed(3))
    write_slot(extended, 16, b2.to(DEVICE), 1, offsets)
    stacked = 2
    changed = (extended != before).any(dim=0).nonzero().flatten().tolist()
    assert changed and all(16 + stacked <= c < 16 + 2 * stacked for c in changed), changed
    scales = slot_scales(scalings.to(DEVICE), ranks.to(DEVICE))
    out = linear(x.to(DEVICE), extended, None, a.to(DEVICE), token_slots.to(DEVICE), scales)
    expected = x.double() @ weight.double().T + reference_delta(x, a, b2, token_slots, scalings, ranks, offsets)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-4)


def test_bf16_stays_close_to_the_float64_reference():
    offsets = [0, 64, 80, 96]
    x, a, b, token_slots, scalings, ranks = make_case(tokens=64, slots=8, rank=1, in_dim=128, offsets=offsets,
                                                      dtype=torch.bfloat16, seed=3)
    weight = torch.zeros(96, 128, dtype=torch.bfloat16)  # the LoRA alone: a base output would hide its error
    scales = slot_scales(scalings.to(DEVICE), ranks.to(DEVICE))
    out = linear(x.to(DEVICE), extended_for(weight, b, offsets), None, a.to(DEVICE), token_slots.to(DEVICE), scales)
    assert out.dtype == torch.bfloat16
    expected = reference_delta(x, a, b, token_slots, scalings, ranks, offsets)
    err = (out.double().cpu() - expected).abs().max() / expected.abs().max()
    assert err < 0.01, f"bf16 relative error {err:.4f}"


def test_extend_weight_keeps_the_base_weight_and_zeros_the_rest():
    weight = torch.randn(10, 7)
    extended = extend_weight(weight, slots=3, stacked=3)
    assert extended.shape == (10, 7 + COLUMN_MULTIPLE)
    assert torch.equal(extended[:, :7], weight) and (extended[:, 7:] == 0).all()
    assert extra_columns(33, 3) == 112 and extra_columns(32, 1) == 32


def test_no_tokens():
    x, a, b, token_slots, scalings, ranks = make_case(tokens=0, slots=2, rank=1, in_dim=8, offsets=[0, 8])
    scales = slot_scales(scalings, ranks)
    out = linear(x.to(DEVICE), extended_for(torch.randn(8, 8), b, [0, 8]), None, a.to(DEVICE),
                 token_slots.to(DEVICE), scales.to(DEVICE))
    assert out.shape == (0, 8)


def test_bad_shapes_are_refused():
    x, a, b, token_slots, scalings, ranks = make_case(tokens=4, slots=2, rank=2, in_dim=8, offsets=[0, 6, 12])
    scales, slots = slot_scales(scalings, ranks).to(DEVICE), token_slots.to(DEVICE)
    extended = extend_weight(torch.randn(12, 8).to(DEVICE), 2, 4)
    with pytest.raises(ValueError, match=r"slice offsets \[0, 6, 10\] must run from 0 to the B buffer's 12 rows"):
        write_slot(extended, 8, b.to(DEVICE), 0, [0, 6, 10])
    with pytest.raises(ValueError, match="slot 5 does not fit the extended weight's 16 extra columns"):
        write_slot(extended, 8, b.to(DEVICE), 5, [0, 6, 12])
    with pytest.raises(ValueError, match="2 slots of 4 LoRA-A rows need 8 extra columns, not 4"):
        fused_input(x.to(DEVICE), a.to(DEVICE), slots, scales, 4)
    with pytest.raises(ValueError, match="x has 7 features, the A buffer 8"):
        fused_input(x[:, :7].contiguous().to(DEVICE), a.to(DEVICE), slots, scales, 16)


class LinearMethod:
    """What SGLang's unquantized linear method does in `apply`: the base GEMM."""

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.weight, bias)

    def process_weights_after_loading(self, layer):
        return "the base method's"


def test_the_plugins_fused_linear_replaces_a_modules_base_gemm_and_lora_step():
    """eslora's SGLang plugin gives a LoRA-wrapped projection a quant method that returns base +
    LoRA from one GEMM, and writes a slot's B when SGLang says it loaded that slot. Here on a
    stand-in of SGLang's LoRA module (its attributes as SGLang 0.5.17 sets them): the GPU test
    (tests/test_sglang_gpu.py) runs it inside a real server."""
    from types import SimpleNamespace

    from eslora.backends.sglang_plugin import FusedLoRALinear

    offsets = [0, 16, 20, 24]
    x, a, b, token_slots, scalings, ranks = make_case(tokens=21, slots=4, rank=1, in_dim=32, offsets=offsets)
    layer = torch.nn.Linear(32, 24).to(DEVICE)
    layer.quant_method = LinearMethod()
    weight_before = layer.weight.detach().clone()
    backend = SimpleNamespace(token_slots=token_slots.to(DEVICE), scales=slot_scales(scalings, ranks).to(DEVICE))
    module = SimpleNamespace(base_layer=layer, lora_active=False)
    method = FusedLoRALinear(module, backend, slots=4, stacked=3)
    assert layer.weight.data_ptr() == method.extended.data_ptr(), "the base weight is a view of the extended one"
    assert torch.equal(layer.weight.detach(), weight_before)
    method.write_slots({0})  # before SGLang points the module at its buffers: nothing to write yet
    module.A_buffer_qkv, module.B_buffer_qkv = a.to(DEVICE), b.to(DEVICE)
    module.output_offset_cpu = torch.tensor(offsets, dtype=torch.int32)
    method.write_slots({0, 1, 2, 3})
    base = x.double() @ weight_before.double().cpu().T + layer.bias.detach().double().cpu()
    with torch.no_grad():
        plain = method.apply(layer, x.to(DEVICE), layer.bias)  # no LoRA batch: the base method
        module.lora_active = True
        fused = method.apply(layer, x.to(DEVICE), layer.bias)
    torch.testing.assert_close(plain.double().cpu(), base, rtol=1e-5, atol=1e-4)
    expected = base + reference_delta(x, a, b, token_slots, scalings, ranks, offsets)
    torch.testing.assert_close(fused.double().cpu(), expected, rtol=1e-5, atol=1e-4)
    assert method.process_weights_after_loading(layer) == "the base method's"
