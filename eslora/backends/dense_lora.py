"""Multi-LoRA as dense GEMMs over every adapter slot: the math of eslora's `dense` SGLang LoRA backend.

SGLang's LoRA kernels (triton, csgmv) give each token its own adapter's weights through segment
GEMMs. At ES's shapes (rank 1-4, 8-32 adapter slots, hundreds of decode tokens) each adapter's
segment is a few rows, so the shrink's blocks are few and each walks the whole input dimension
(8,960 on the 1.5B's down_proj) alone. All slots' A matrices together are only slots x rank rows,
so here every token is multiplied by all of them in one cuBLAS GEMM, a (tokens x slots) table of
coefficients keeps each token's own slot (scaled, zero elsewhere), and the expand is one GEMM per
output slice against all slots' B matrices. The extra work (slots x the needed shrink FLOPs) is
small at these ranks. Pure torch on SGLang's buffer layouts: no SGLang import, so it runs on CPU.

Layouts (SGLang 0.5.17's LoRA memory pool; S slots, R the server's max LoRA rank):
A buffer (S, c * R, K) with c stacked slices (3 for qkv, 2 for gate_up); B buffer (S, N, R), slice i
of the output being columns offsets[i]:offsets[i+1]. Every loaded adapter must have rank R (eslora's
members all have lora.r, and the server's max rank is lora.r); a slot of rank 0 adds nothing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def slot_coefficients(token_slots: torch.Tensor, scalings: torch.Tensor, ranks: torch.Tensor,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(tokens, S) float32: row t holds token t's slot's scaling in that slot's column, 0 elsewhere,
    and 0 throughout when the slot holds no adapter (rank 0, e.g. a base-model request).

    `token_slots` (tokens,): each token's slot; `scalings`, `ranks` (at least S,): per slot.
    With `out` (at least tokens x S, float32: a static buffer under CUDA graphs) the rows are written
    in place and `out[:tokens]` is returned; S is then out's width, else len(scalings)."""
    slots = out.shape[1] if out is not None else scalings.shape[0]
    active = torch.where(ranks[:slots] > 0, scalings[:slots].float(), 0.0)
    onehot = token_slots[:, None] == torch.arange(slots, device=token_slots.device)
    if out is None:
        return onehot * active[None, :]
    rows = out[: token_slots.shape[0]]
    torch.mul(onehot, active[None, :], out=rows)
    return rows


def shrink(x: torch.Tensor, a_weights: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Every slot's LoRA-A product, kept only in each token's own slot and scaled there:
    (tokens, S, c * R) from `x` (tokens, K), the A buffer (S, c * R, K) and `coefficients` (tokens, S)."""
    slots, stacked, k = a_weights.shape
    products = torch.matmul(x, a_weights.view(slots * stacked, k).t()).view(x.shape[0], slots, stacked)
    return products.mul_(coefficients[: x.shape[0], :slots, None])  # in place: x's dtype, float32 coefficients


def expand(z: torch.Tensor, b_weights: torch.Tensor, offsets: Sequence[int],
           base_output: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Add each slice's LoRA-B product to its output columns: `z` (tokens, S, c * R) from `shrink`,
    the B buffer (S, N, R), `offsets` the c + 1 column offsets of the slices in N. Adds into
    `base_output` (tokens, N) in place and returns it (a new tensor when None)."""
    tokens, slots, stacked = z.shape
    rank = b_weights.shape[-1]
    if stacked != rank * (len(offsets) - 1):
        raise ValueError(f"LoRA-A output has {stacked} columns per slot; {len(offsets) - 1} slices of rank {rank} need "
                         f"{rank * (len(offsets) - 1)}")
    out = base_output if base_output is not None else z.new_zeros(tokens, b_weights.shape[1])
    for i in range(len(offsets) - 1):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        zi = z[:, :, i * rank:(i + 1) * rank].reshape(tokens, slots * rank)
        wi = b_weights[:, lo:hi, :].permute(0, 2, 1).reshape(slots * rank, hi - lo)  # a view at rank 1
        out[:, lo:hi].addmm_(zi, wi)
    return out

