"""Multi-LoRA inside the base GEMM: the math of eslora's `fused` SGLang LoRA backend.

A projection with LoRA on a batch of tokens t, each of adapter slot s(t), is

    out[t] = x[t] W^T + scale[s(t)] (x[t] A[s(t)]^T) B[s(t)]^T

which is one GEMM over a longer K:

    out = [x | z] [W | E]^T

where z (tokens, S * c * R) holds each token's own slot's scaled LoRA-A products in that slot's
columns and zeros in every other slot's, and E (N, S * c * R) holds every slot's B: slice i's rows
(output columns offsets[i]:offsets[i + 1]) in the slot's stacked columns i * R .. i * R + R, zeros
elsewhere. The base GEMM then does the expand. `gathered` (eslora/backends/gathered_lora.py) adds
the expand as a second kernel that reads and writes the whole output again (gate_up's 2 x 8,960
columns of the 1.5B model dominate its bytes) and pays a launch per module; here a module's LoRA
is one kernel that copies x into [x | z] while computing z (reading x once, as a shrink does) and
the GEMM's extra S * c * R columns of K (at rank 1, 33 slots: 99 + padding on qkv's K of 1,536).

E lives in an extended copy of the base weight, (N, K + extra); the base layer's weight becomes
its first K columns (a strided view, so no memory is kept twice). A slot's columns are written
when SGLang loads an adapter into that slot (`write_slot`), from the slot's rows of SGLang's B
buffer. Layouts are SGLang 0.5.17's LoRA memory pool, as in gathered_lora: A (S, c * R, K),
B (S, N, R); every loaded adapter has rank R. On a machine without a GPU the kernel runs under
Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported), as the CPU tests do.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from eslora.backends.gathered_lora import shrink_block_m, token_slots_and_scales

COLUMN_MULTIPLE = 16  # extra columns padded to keep K' a multiple of 16 elements (aligned tensor-core rows)


def extra_columns(slots: int, stacked: int) -> int:
    """Extra K columns for `slots` slots of `stacked` (= c * R) LoRA-A rows each, padded."""
    return -(-slots * stacked // COLUMN_MULTIPLE) * COLUMN_MULTIPLE


def extend_weight(weight: torch.Tensor, slots: int, stacked: int) -> torch.Tensor:
    """(N, K + extra): `weight` (N, K) in the first K columns, zeros in the extra ones."""
    n_dim, k_dim = weight.shape
    extended = torch.zeros(n_dim, k_dim + extra_columns(slots, stacked), dtype=weight.dtype, device=weight.device)
    extended[:, :k_dim].copy_(weight)
    return extended


def write_slot(extended: torch.Tensor, k_dim: int, b_weights: torch.Tensor, slot: int, offsets: Sequence[int]) -> None:
    """Copy slot `slot`'s B (from SGLang's B buffer (S, N, R)) into its extra columns of `extended`:
    slice i (rows offsets[i]:offsets[i + 1]) into columns k_dim + slot * c * R + i * R .. + R, zeros in
    the slot's columns of the other slices' rows."""
    _, n_dim, rank = b_weights.shape
    slices = len(offsets) - 1
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_dim or extended.shape[0] != n_dim:
        raise ValueError(f"slice offsets {list(offsets)} must run from 0 to the B buffer's {n_dim} rows")
    first = k_dim + slot * slices * rank
    if first + slices * rank > extended.shape[1]:
        raise ValueError(f"slot {slot} does not fit the extended weight's {extended.shape[1] - k_dim} extra columns")
    columns = extended[:, first:first + slices * rank]
    columns.zero_()
    for i in range(slices):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        columns[lo:hi, i * rank:(i + 1) * rank].copy_(b_weights[slot, lo:hi, :])


@triton.jit
def _fused_input_kernel(x_ptr, a_ptr, token_slots_ptr, scales_ptr, xz_ptr, tokens, k_dim, extra,
                        stride_xm, stride_as, stride_aj, stride_xzm,
                        STACKED: tl.constexpr, STACKED_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    slot, scale, live = token_slots_and_scales(token_slots_ptr, scales_ptr, rows, row_ok)
    stacked = tl.arange(0, STACKED_POW2)
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    xz_rows = xz_ptr + rows[:, None].to(tl.int64) * stride_xzm
    a_rows = a_ptr + slot[:, None, None] * stride_as + stacked[None, :, None] * stride_aj
    a_ok = live[:, None, None] & (stacked < STACKED)[None, :, None]
    acc = tl.zeros((BLOCK_M, STACKED_POW2), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k = k0 + cols
        k_ok = row_ok[:, None] & (k < k_dim)[None, :]
        x = tl.load(x_rows + k[None, :], mask=k_ok, other=0.0)
        tl.store(xz_rows + k[None, :], x, mask=k_ok)  # every token's x: base-model tokens need it too
        a = tl.load(a_rows + k[None, None, :], mask=a_ok & (k < k_dim)[None, None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * a.to(tl.float32), axis=2)
    z = (acc * scale[:, None]).to(xz_ptr.dtype.element_ty)
    # zeros in every extra column but the token's own slot's, then the slot's products there: the
    # two stores never touch the same address, so no barrier orders them
    for e0 in range(0, extra, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        others = row_ok[:, None] & (e < extra)[None, :] & ((e // STACKED)[None, :] != slot[:, None])
        tl.store(xz_rows + k_dim + e[None, :], tl.zeros((BLOCK_M, BLOCK_E), dtype=z.dtype), mask=others)
    tl.store(xz_rows + k_dim + slot[:, None] * STACKED + stacked[None, :], z,
             mask=row_ok[:, None] & (stacked < STACKED)[None, :])


def fused_input(x: torch.Tensor, a_weights: torch.Tensor, token_slots: torch.Tensor, scales: torch.Tensor,
                extra: int) -> torch.Tensor:
    """[x | z] (tokens, K + extra) in x's dtype: `x` (tokens, K), then each token's own slot's scaled
    LoRA-A products (A buffer (S, c * R, K), `token_slots` (tokens,), `scales` (S,) from
    gathered_lora.slot_scales) in columns K + slot * c * R .., zeros in the other extra columns."""
    tokens, k_dim = x.shape
    slots, stacked, a_k = a_weights.shape
    if a_k != k_dim:
        raise ValueError(f"x has {k_dim} features, the A buffer {a_k}")
    if slots * stacked > extra:
        raise ValueError(f"{slots} slots of {stacked} LoRA-A rows need {slots * stacked} extra columns, not {extra}")
    if x.stride(1) != 1 or a_weights.stride(2) != 1:
        raise ValueError("fused_input needs x and the A buffer contiguous along K")
    xz = torch.empty(tokens, k_dim + extra, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return xz
    block_m = shrink_block_m(tokens)
    stacked_pow2 = triton.next_power_of_2(stacked)
    block_k = max(16, min(512, 4096 // (block_m * stacked_pow2)))
    block_e = min(128, triton.next_power_of_2(extra))
    _fused_input_kernel[(triton.cdiv(tokens, block_m),)](
        x, a_weights, token_slots, scales, xz, tokens, k_dim, extra,
        x.stride(0), a_weights.stride(0), a_weights.stride(1), xz.stride(0),
        STACKED=stacked, STACKED_POW2=stacked_pow2, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_E=block_e)
    return xz


def linear(x: torch.Tensor, extended: torch.Tensor, bias: Optional[torch.Tensor], a_weights: torch.Tensor,
           token_slots: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The base projection with every token's own slot's LoRA: one GEMM of [x | z] against the
    extended weight (N, K + extra) from `extend_weight` / `write_slot`."""
    k_dim = x.shape[-1]
    xz = fused_input(x.reshape(-1, k_dim), a_weights, token_slots, scales, extended.shape[1] - k_dim)
    return F.linear(xz, extended, bias).reshape(*x.shape[:-1], extended.shape[0])
