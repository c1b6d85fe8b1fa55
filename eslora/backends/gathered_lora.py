"""Multi-LoRA with each token's own adapter gathered inside a Triton kernel: the math of eslora's
`gathered` SGLang LoRA backend.

`dense` (eslora/backends/dense_lora.py) multiplies every token by every slot's weights through
cuBLAS and masks; what it costs at ES's shapes is kernel count (14-20 per layer: GEMMs, a mask
multiply, one expand per slice, their launches) more than FLOPs (docs/benchmarks.md, session 10).
Here a module's LoRA is two kernels whatever the slice count: the shrink reads each token's row
and its own slot's stacked A rows and writes the token's scaled products (tokens x c * R, float32);
the expand reads those and the token's slot's B rows and adds into the base output in place,
choosing each column's slice by comparing it against the slice boundaries. Tokens of a slot with
no adapter (rank 0: a base-model request) read no weights and add nothing.

Layouts are SGLang 0.5.17's LoRA memory pool, as in dense_lora: A (S, c * R, K), B (S, N, R),
slice i of the output being columns offsets[i]:offsets[i + 1] (c <= 3). Every loaded adapter has
rank R (the server's max rank is lora.r). On a machine without a GPU the kernels run under Triton's
interpreter (TRITON_INTERPRET=1, set before this module is imported), which the CPU tests use.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

MAX_SLICES = 3  # qkv; gate_up has 2, the others 1


def slot_scales(scalings: torch.Tensor, ranks: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(S,) float32: each slot's scaling, 0 where the slot holds no adapter (rank 0). With `out` (a
    static buffer under CUDA graphs) written in place; S is then out's length, else len(scalings)."""
    slots = out.shape[0] if out is not None else scalings.shape[0]
    zero = torch.zeros((), dtype=torch.float32, device=scalings.device)
    if out is None:
        return torch.where(ranks[:slots] > 0, scalings[:slots].float(), zero)
    return torch.where(ranks[:slots] > 0, scalings[:slots].float(), zero, out=out)


@triton.jit
def token_slots_and_scales(token_slots_ptr, scales_ptr, rows, row_ok):
    """Each row's slot (int64), that slot's scale, and whether the row has an adapter (scale != 0):
    the start of every eslora LoRA kernel (here and in fused_lora)."""
    slot = tl.load(token_slots_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    scale = tl.load(scales_ptr + slot, mask=row_ok, other=0.0)
    return slot, scale, row_ok & (scale != 0.0)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, token_slots_ptr, scales_ptr, z_ptr, tokens, k_dim,
                   stride_xm, stride_as, stride_aj, stride_zm,
                   STACKED: tl.constexpr, STACKED_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    slot, scale, live = token_slots_and_scales(token_slots_ptr, scales_ptr, rows, row_ok)
    stacked = tl.arange(0, STACKED_POW2)
    cols = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + slot[:, None, None] * stride_as + stacked[None, :, None] * stride_aj
    a_ok = live[:, None, None] & (stacked < STACKED)[None, :, None]
    acc = tl.zeros((BLOCK_M, STACKED_POW2), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k = k0 + cols
        k_ok = k < k_dim
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + k[None, :], mask=live[:, None] & k_ok[None, :],
                    other=0.0)
        a = tl.load(a_rows + k[None, None, :], mask=a_ok & k_ok[None, None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * a.to(tl.float32), axis=2)
    tl.store(z_ptr + rows[:, None] * stride_zm + stacked[None, :], acc * scale[:, None],
             mask=row_ok[:, None] & (stacked < STACKED)[None, :])


@triton.jit
def _expand_kernel(z_ptr, b_ptr, token_slots_ptr, scales_ptr, out_ptr, tokens, n_dim, second_slice, third_slice,
                   stride_zm, stride_bs, stride_bn, stride_om,
                   RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < tokens
    col_ok = cols < n_dim
    slot, scale, has_adapter = token_slots_and_scales(token_slots_ptr, scales_ptr, rows, row_ok)
    live = has_adapter[:, None] & col_ok[None, :]
    column_slice = (cols >= second_slice).to(tl.int32) + (cols >= third_slice).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in tl.static_range(RANK):
        z = tl.load(z_ptr + rows[:, None] * stride_zm + column_slice[None, :] * RANK + r, mask=live, other=0.0)
        b = tl.load(b_ptr + slot[:, None] * stride_bs + cols[None, :] * stride_bn + r, mask=live, other=0.0)
        acc += z * b.to(tl.float32)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    base = tl.load(out_ptrs, mask=out_ok, other=0.0)
    tl.store(out_ptrs, (base.to(tl.float32) + acc).to(base.dtype), mask=out_ok)


def shrink_block_m(tokens: int) -> int:
    # at least ~128 programs: a token's product is one dot over K per stacked row, so parallelism
    # comes from tokens alone (down_proj's K of 8,960 on few rows is the slow case)
    return max(1, min(16, triton.next_power_of_2(max(1, tokens // 128))))


def shrink(x: torch.Tensor, a_weights: torch.Tensor, token_slots: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each token's own slot's LoRA-A products, scaled: (tokens, c * R) float32 from `x` (tokens, K),
    the A buffer (S, c * R, K), `token_slots` (tokens,) and `scales` (S,) from `slot_scales`."""
    tokens, k_dim = x.shape
    _, stacked, _ = a_weights.shape
    if x.stride(1) != 1 or a_weights.stride(2) != 1:
        raise ValueError("shrink needs x and the A buffer contiguous along K")
    z = torch.empty(tokens, stacked, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return z
    block_m = shrink_block_m(tokens)
    stacked_pow2 = triton.next_power_of_2(stacked)
    block_k = max(16, min(512, 4096 // (block_m * stacked_pow2)))
    _shrink_kernel[(triton.cdiv(tokens, block_m),)](
        x, a_weights, token_slots, scales, z, tokens, k_dim,
        x.stride(0), a_weights.stride(0), a_weights.stride(1), z.stride(0),
        STACKED=stacked, STACKED_POW2=stacked_pow2, BLOCK_M=block_m, BLOCK_K=block_k)
    return z


def expand(z: torch.Tensor, b_weights: torch.Tensor, offsets: Sequence[int], token_slots: torch.Tensor,
           scales: torch.Tensor, base_output: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Add each token's slot's LoRA-B product to its output columns, each column's slice chosen by
    `offsets` (the c + 1 column offsets in N): `z` (tokens, c * R) from `shrink`, the B buffer
    (S, N, R). Adds into `base_output` (tokens, N) in place and returns it (zeros of B's dtype
    when None)."""
    tokens, stacked = z.shape
    _, n_dim, rank = b_weights.shape
    slices = len(offsets) - 1
    if not 1 <= slices <= MAX_SLICES or stacked != rank * slices:
        raise ValueError(f"LoRA-A output has {stacked} columns; {slices} slices of rank {rank} need {rank * slices} "
                         f"(1 to {MAX_SLICES} slices)")
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_dim:
        raise ValueError(f"slice offsets {list(offsets)} must run from 0 to the B buffer's {n_dim} columns")
    out = base_output if base_output is not None else z.new_zeros(tokens, n_dim, dtype=b_weights.dtype)
    if out.stride(1) != 1 or b_weights.stride(2) != 1 or z.stride(1) != 1:
        raise ValueError("expand needs z, the B buffer and the output contiguous along their last dimension")
    if tokens == 0:
        return out
    bounds = [int(o) for o in offsets[1:-1]] + [n_dim] * (MAX_SLICES - slices)
    block_m, block_n = 16, 128
    _expand_kernel[(triton.cdiv(tokens, block_m), triton.cdiv(n_dim, block_n))](
        z, b_weights, token_slots, scales, out, tokens, n_dim, bounds[0], bounds[1],
        z.stride(0), b_weights.stride(0), b_weights.stride(1), out.stride(0),
        RANK=rank, BLOCK_M=block_m, BLOCK_N=block_n)
    return out
