"""The full-weight ES peer's in-place perturbation, run inside SGLang's model process.

SGLang 0.5.17 calls a `--custom-weight-loader` function as `fn(model, named_tensors)` when
`update_weights_from_tensor(..., load_format="<its import path>")` names it. Here the one tensor
sent is `[seed, scale]` (16 bytes), and every weight of the served model becomes
`w + scale * N(0, 1)`, the noise regenerated from the seed on the GPU: the structure of the ES
paper's code and of es-at-scale's accelerated vLLM loop. Restoring is the same call with
`-scale`; in bf16, `w + n - n` is `w` up to rounding, as in those codes.
"""

from __future__ import annotations

from typing import Any, Sequence

LOADER = "bench.inplace_perturb.perturb_in_place"


def perturb_in_place(model: Any, named_tensors: Sequence[tuple[str, Any]]) -> None:
    import torch

    seed, scale = (float(x) for x in named_tensors[0][1].tolist())
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            gen = torch.Generator(device=param.device).manual_seed(int(seed) * 1_000_003 + i)
            param.add_(torch.randn(param.shape, generator=gen, device=param.device, dtype=param.dtype), alpha=scale)
