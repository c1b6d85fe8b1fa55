"""eslora's SGLang plugin: serving levers SGLang 0.5.17 has no flag for.

- `backend.sglang.adapter_layers_only` (ESLORA_SGLANG_LORA_LAYERS): LoRA kernels only on the
  layers the adapters train. SGLang wraps every layer's target modules with its LoRA layers and
  zero-fills an adapter's missing layers, so an adapter on layers 0-9 of 24 runs the LoRA kernels
  (shrink + expand per module) on all 24 in every forward. The plugin puts the base modules back
  on the other layers once SGLang has wrapped them, so those layers run the plain path.
- `backend.sglang.lean_adapter_loads` (ESLORA_SGLANG_LEAN_LOADS=1): adapter loads and unloads
  without the free-memory queries SGLang puts in their log lines. Those f-strings run whatever the
  log level, and each query empties the CUDA cache (`get_available_gpu_memory(empty_cache=True)`):
  four per member, in the scheduler's loop, each a device-wide sync whose freed blocks later
  allocations pay for again.
- `backend.sglang.lora_backend=dense`, `gathered` or `fused` (ESLORA_SGLANG_LORA_BACKEND): the
  server is started with `--lora-backend triton` and the plugin puts its own backend class in that
  name's place: SGLang's triton backend with the LoRA of the projection modules computed by eslora,
  as dense GEMMs over all adapter slots (`eslora.backends.dense_lora`), in Triton kernels that
  gather each token's own slot's weights (`eslora.backends.gathered_lora`), or inside the base
  projection's GEMM over a K extended by every slot's LoRA columns (`eslora.backends.fused_lora`;
  the plugin then also gives each projection module a base GEMM that does it, `FusedLoRALinear`):
  why, and the math, there.
- `backend.sglang.lora_prefill_graphs` (ESLORA_SGLANG_PREFILL_GRAPHS=1): those backends in
  SGLang's prefill CUDA graphs, for any number of requests. SGLang's LoRA prefill graphs take at
  most 32 requests (triton's static request segments); a chunk of 8,192 tokens of short prompts
  holds about 60, so on a LoRA server those chunks run eager while a plain server replays them.

It is loaded through SGLang's plugin framework (`sglang.srt.plugins`, the entry point
`eslora` in pyproject.toml), which calls `register()` early in every SGLang process
(the scheduler included); without its variables it does nothing. It reports what it did as JSON
to ESLORA_SGLANG_PLUGIN_REPORT, which the backend reads after start-up: a server whose Python
lacks the entry point (eslora not installed there) is an error there, not a silent slowdown.

Only the standard library is imported at module level: this runs inside SGLang's processes.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable, Sequence

LAYERS_ENV = "ESLORA_SGLANG_LORA_LAYERS"
LEAN_LOADS_ENV = "ESLORA_SGLANG_LEAN_LOADS"
LORA_BACKEND_ENV = "ESLORA_SGLANG_LORA_BACKEND"
PREFILL_GRAPHS_ENV = "ESLORA_SGLANG_PREFILL_GRAPHS"
# backend.sglang.lora_backend values the plugin serves -> the class its report then names
LORA_BACKEND_CLASSES = {"dense": "DenseLoRABackend", "gathered": "GatheredLoRABackend", "fused": "FusedLoRABackend"}
# the modules those backends compute LoRA for (SGLang's fused qkv / gate_up and o / down)
PROJECTION_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
REPORT_ENV = "ESLORA_SGLANG_PLUGIN_REPORT"
MANAGER = "sglang.srt.lora.lora_manager.LoRAManager"


def parse_layers(text: str) -> frozenset[int]:
    """"0,1,2" -> {0, 1, 2} (the variable's format; `format_layers` writes it)."""
    return frozenset(int(part) for part in text.split(",") if part.strip())


def format_layers(layers: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(set(layers)))


def unwrap_outside(model: Any, lora_modules: Sequence[dict[str, Any]], keep: frozenset[int]) -> int:
    """Put the base module back (`module.base_layer`, SGLang's LoRA layers keep it there) for every
    LoRA-wrapped module of a layer not in `keep`, and forget it in `lora_modules` (SGLang's
    per-layer {module name: LoRA module} table, which it walks to point modules at their slots'
    weights), so forwards take the plain path there. Returns the number of modules unwrapped."""
    unwrapped = 0
    for layer_id, modules in enumerate(lora_modules):
        if layer_id in keep:
            continue
        for name, module in modules.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.base_layer)
            unwrapped += 1
        modules.clear()
    return unwrapped


def _lean_loads() -> bool:
    return os.environ.get(LEAN_LOADS_ENV) == "1"


def _prefill_graphs() -> bool:
    return os.environ.get(PREFILL_GRAPHS_ENV) == "1"


def _plugin_lora_backend() -> str:
    name = os.environ.get(LORA_BACKEND_ENV, "")
    if name and name not in LORA_BACKEND_CLASSES:
        raise ValueError(f"{LORA_BACKEND_ENV}={name!r}: use one of {', '.join(LORA_BACKEND_CLASSES)}")
    return name


def token_slots(request_slots: Any, tokens_per_request: Any, tokens: int, static: Any = None) -> Any:
    """Each token's adapter slot from its request's and each request's token count (`tokens`: the
    sum). With `static` (a CUDA graph's buffer) the result is a view of its first rows and the rest
    is zeroed: a graph runs a padded token count, whose padding rows read slot 0 (outputs dropped)."""
    slots = request_slots.repeat_interleave(tokens_per_request, output_size=tokens)
    if static is None:
        return slots
    static[:tokens].copy_(slots)
    static[tokens:].zero_()
    return static[:tokens]


def plugin_backend_class(name: str) -> type:
    """SGLang's TritonLoRABackend with the projection modules' LoRA computed by eslora: `dense`
    (every slot's weights through cuBLAS, eslora.backends.dense_lora), `gathered` (each token's own
    slot's weights in two Triton kernels per module, eslora.backends.gathered_lora) or `fused`
    (gathered's tables, read by the projections' own GEMMs that `fuse_projections` installs).

    Prefill and decode alike: each forward's per-token slots (and the tables the math reads) are
    computed once in `prepare_lora_batch` (outside any CUDA graph; under a decode graph into
    static buffers the captured kernels read) and shared by every LoRA module of every layer. The
    lm_head's pruned LoRA and the embedding's stay triton's. Prefill CUDA graphs, if asked for
    (ESLORA_SGLANG_PREFILL_GRAPHS): each token's slot goes into a static buffer of the largest
    captured token count, so a graph takes any number of requests (triton's own prefill metadata,
    32 request segments, is not used by these kernels)."""
    import torch
    from sglang.srt.lora.backend.triton_backend import TritonLoRABackend

    class ProjectionLoRABackend(TritonLoRABackend):
        name = "triton"  # what SGLang was told; the report names the class
        supports_prefill_cuda_graph = _prefill_graphs()

        def __init__(self, max_loras_per_batch: int, device: Any, **kwargs: Any) -> None:
            super().__init__(max_loras_per_batch, device, **kwargs)
            self._graph_tokens_per_req = 1
            self._graph_token_slots: Any = None  # static, when a graph's request holds several tokens
            # each graph kind's static tables: decode and prefill graphs are captured at different
            # times, so each keeps the buffers its kernels were captured reading
            self._graph_tables: dict[str, Any] = {}
            self._prefill_token_slots: Any = None

        def init_cuda_graph_batch_info(self, max_bs_in_cuda_graph: int, num_tokens_per_req: int) -> None:
            super().init_cuda_graph_batch_info(max_bs_in_cuda_graph, num_tokens_per_req)
            self._graph_tokens_per_req = num_tokens_per_req
            max_tokens = max_bs_in_cuda_graph * num_tokens_per_req
            if num_tokens_per_req > 1:
                self._graph_token_slots = torch.zeros(max_tokens, dtype=torch.int32, device="cuda")
            self._graph_tables["decode"] = self.init_graph_tables(max_tokens)

        def init_prefill_cuda_graph_batch_info(self, max_num_tokens: int) -> None:
            super().init_prefill_cuda_graph_batch_info(max_num_tokens)
            self.prefill_cuda_graph_max_bs = max_num_tokens  # a request holds >= 1 token: any count fits
            self._prefill_token_slots = torch.zeros(max_num_tokens, dtype=torch.int32, device="cuda")
            self._graph_tables["prefill"] = self.init_graph_tables(max_num_tokens)

        def init_graph_tables(self, max_tokens: int) -> Any:
            """The static buffers `prepare_tables` writes under a CUDA graph of up to `max_tokens`."""

        def prepare_tables(self, token_slots: Any, graph_tables: Any) -> None:
            """This forward's tables from each token's slot (`token_slots`, static under graphs),
            written into `graph_tables` (a graph's static buffers) unless it is None (eager)."""
            raise NotImplementedError

        def prepare_lora_batch(self, forward_batch: Any, weight_indices: list[int], lora_ranks: list[int],
                               scalings: list[float], use_cuda_graph: bool, use_prefill_cuda_graph: bool = False) -> None:
            # triton's prefill-graph metadata (32 request segments) is not what these kernels read:
            # its eager batch info serves the lm_head and embedding paths, which no graph captures here
            super().prepare_lora_batch(forward_batch, weight_indices, lora_ranks, scalings, use_cuda_graph)
            info, bs = self.batch_info, forward_batch.batch_size
            slots = info.weight_indices[:bs]  # under graphs a view of triton's static buffer
            graph = "decode" if use_cuda_graph else "prefill" if use_prefill_cuda_graph else None
            if use_cuda_graph and self._graph_tokens_per_req > 1:
                slots = token_slots(slots, self._graph_tokens_per_req, bs * self._graph_tokens_per_req,
                                    self._graph_token_slots)
            elif not use_cuda_graph and forward_batch.forward_mode.is_extend():
                slots = token_slots(slots, info.seg_lens[:bs].long(), int(sum(forward_batch.extend_seq_lens_cpu)),
                                    self._prefill_token_slots if use_prefill_cuda_graph else None)
            self.prepare_tables(slots, self._graph_tables.get(graph))

        def compute_sgemm_routing(self, use_cuda_graph: bool) -> None:
            # triton's per-decode sort of tokens by adapter (argsort, searchsorted, copies) feeds only
            # the segment kernels replaced here; the lm_head's pruned rows bring their own batch info
            self.sgemm_batch_info = None

        def shrink(self, x: Any, weights: Any) -> Any:
            raise NotImplementedError

        def expand(self, z: Any, weights: Any, offsets: Sequence[int], base_output: Any) -> Any:
            raise NotImplementedError

        def run_lora_a_sgemm(self, x: Any, weights: Any, pruned_batch_info: Any = None, stack_num: int = 1,
                             *args: Any, **kwargs: Any) -> Any:
            if pruned_batch_info is not None:  # the lm_head's pruned rows: triton's segments
                return super().run_lora_a_sgemm(x, weights, pruned_batch_info, stack_num, *args, **kwargs)
            return self.shrink(x, weights)

        def run_lora_b_sgemm(self, x: Any, weights: Any, base_output: Any = None, pruned_batch_info: Any = None,
                             *args: Any, **kwargs: Any) -> Any:
            if pruned_batch_info is not None:
                return super().run_lora_b_sgemm(x, weights, base_output, pruned_batch_info, *args, **kwargs)
            return self.expand(x, weights, (0, weights.shape[-2]), base_output)

        def run_qkv_lora(self, x: Any, qkv_lora_a: Any, qkv_lora_b: Any, output_offset: Any, max_qkv_out_dim: int,
                         base_output: Any = None, n_slices: int = 3, *args: Any, **kwargs: Any) -> Any:
            offsets = kwargs.get("output_offset_cpu")
            offsets = (offsets if offsets is not None else output_offset).tolist()  # the CPU copy: no sync
            return self.expand(self.shrink(x, qkv_lora_a), qkv_lora_b, offsets, base_output)

        def run_gate_up_lora(self, x: Any, gate_up_lora_a: Any, gate_up_lora_b: Any, base_output: Any = None,
                             *args: Any, **kwargs: Any) -> Any:
            half = gate_up_lora_b.shape[-2] // 2
            return self.expand(self.shrink(x, gate_up_lora_a), gate_up_lora_b, (0, half, 2 * half), base_output)

    if name == "dense":
        from eslora.backends import dense_lora

        class DenseLoRABackend(ProjectionLoRABackend):
            coefficients: Any = None  # (tokens, slots) float32 of the prepared forward

            def init_graph_tables(self, max_tokens: int) -> Any:
                return torch.zeros(max_tokens, self.max_loras_per_batch, dtype=torch.float32, device="cuda")

            def prepare_tables(self, token_slots: Any, graph_tables: Any) -> None:
                info = self.batch_info
                self.coefficients = dense_lora.slot_coefficients(token_slots, info.scalings, info.lora_ranks,
                                                                 out=graph_tables)

            def shrink(self, x: Any, weights: Any) -> Any:
                return dense_lora.shrink(x, weights, self.coefficients)

            def expand(self, z: Any, weights: Any, offsets: Sequence[int], base_output: Any) -> Any:
                return dense_lora.expand(z, weights, offsets, base_output)

        return DenseLoRABackend
    if name in ("gathered", "fused"):
        from eslora.backends import gathered_lora

        class GatheredLoRABackend(ProjectionLoRABackend):
            token_slots: Any = None  # (tokens,) of the prepared forward
            scales: Any = None  # (slots,) float32: each slot's scaling, 0 without an adapter

            def init_graph_tables(self, max_tokens: int) -> Any:
                return torch.zeros(self.max_loras_per_batch, dtype=torch.float32, device="cuda")

            def prepare_tables(self, token_slots: Any, graph_tables: Any) -> None:
                info = self.batch_info
                self.token_slots = token_slots
                self.scales = gathered_lora.slot_scales(info.scalings[: self.max_loras_per_batch], info.lora_ranks,
                                                        out=graph_tables)

            def shrink(self, x: Any, weights: Any) -> Any:
                return gathered_lora.shrink(x, weights, self.token_slots, self.scales)

            def expand(self, z: Any, weights: Any, offsets: Sequence[int], base_output: Any) -> Any:
                return gathered_lora.expand(z, weights, offsets, self.token_slots, self.scales, base_output)

        if name == "gathered":
            return GatheredLoRABackend

        class FusedLoRABackend(GatheredLoRABackend):
            """The per-forward tables of gathered (each token's slot, each slot's scale), read by the
            projection modules' fused base GEMMs (`FusedLoRALinear`, installed by `fuse_projections`);
            a module left unfused would still get gathered's kernels from this class."""

        return FusedLoRABackend
    raise ValueError(f"no eslora LoRA backend {name!r}: use one of {', '.join(LORA_BACKEND_CLASSES)}")


def use_plugin_backend(name: str) -> None:
    """Put eslora's LoRA backend `name` in the registry under the name `triton` (the server's --lora-backend)."""
    from sglang.srt.lora.backend import lora_registry

    lora_registry.LORA_SUPPORTED_BACKENDS["triton"] = functools.partial(plugin_backend_class, name)


def lora_buffers(module: Any) -> tuple[Any, Any]:
    """A SGLang LoRA module's (A, B) memory-pool buffers; (None, None) before SGLang points it at them."""
    if hasattr(module, "A_buffer_qkv"):
        return module.A_buffer_qkv, module.B_buffer_qkv
    return getattr(module, "A_buffer", None), getattr(module, "B_buffer", None)


class FusedLoRALinear:
    """A projection's quant method (SGLang calls `quant_method.apply(layer, x, bias)` for the base
    output) that returns base + each token's own adapter's LoRA from one GEMM over [x | z]
    (eslora.backends.fused_lora). The module's own LoRA step becomes the identity, and SGLang's
    notification of newly loaded slots (`on_lora_slots_updated`) writes their B into the GEMM's
    extended weight. Everything else is the base method's."""

    def __init__(self, module: Any, backend: Any, slots: int, stacked: int) -> None:
        from eslora.backends import fused_lora

        layer = module.base_layer
        self.base_method, self.module, self.backend = layer.quant_method, module, backend
        self.k_dim = layer.weight.shape[1]
        self.extended = fused_lora.extend_weight(layer.weight.data, slots, stacked)
        layer.weight.data = self.extended[:, : self.k_dim]  # the base GEMM's weight, now a view: kept once

    def apply(self, layer: Any, x: Any, bias: Any = None) -> Any:
        from eslora.backends import fused_lora

        if not self.module.lora_active:
            return self.base_method.apply(layer, x, bias)
        lora_a, _ = lora_buffers(self.module)
        return fused_lora.linear(x, self.extended, bias, lora_a, self.backend.token_slots, self.backend.scales)

    def write_slots(self, slot_ids: Iterable[int]) -> None:
        from eslora.backends import fused_lora

        _, lora_b = lora_buffers(self.module)
        if lora_b is None:  # the pool's first load (the base model's slot, zeros) comes before SGLang sets it
            return
        offsets = self.module.output_offset_cpu.tolist()
        # a slot SGLang writes holds no running request: its columns meet zeros in every token's z,
        # so a forward that reads them mid-write (another stream) adds nothing from them
        for slot in slot_ids:
            fused_lora.write_slot(self.extended, self.k_dim, lora_b, slot, offsets)

    def __getattr__(self, name: str) -> Any:
        if name == "base_method":  # not set yet: no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.base_method, name)


def fuse_projections(manager: Any) -> int:
    """Install `FusedLoRALinear` on every LoRA-wrapped projection left in `manager.lora_modules`
    (SGLang's column-parallel, merged gate_up, qkv and row-parallel LoRA layers). Returns the
    number of modules fused."""
    import torch
    from sglang.srt.lora.layers import (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
                                        QKVParallelLinearWithLoRA, RowParallelLinearWithLoRA)

    fused = 0
    for modules in manager.lora_modules:
        for name, module in modules.items():
            if isinstance(module, QKVParallelLinearWithLoRA):
                slices = 3
            elif isinstance(module, MergedColumnParallelLinearWithLoRA):
                slices = len(module.base_layer.output_partition_sizes)
            elif isinstance(module, (ColumnParallelLinearWithLoRA, RowParallelLinearWithLoRA)):
                slices = 1
            else:
                continue
            if getattr(module.base_layer, "tp_size", 1) != 1:
                # a row-parallel layer under TP reduces before its LoRA-B step: not this GEMM's shape
                raise ValueError(f"lora_backend=fused serves one GPU per server; {name} is split over "
                                 f"{module.base_layer.tp_size}")
            method = FusedLoRALinear(module, manager.lora_backend, manager.max_loras_per_batch,
                                     slices * manager.max_lora_rank)
            module.base_layer.quant_method = method
            module.apply_lora = _base_output_as_is
            module.on_lora_slots_updated = method.write_slots
            fused += 1
    torch.cuda.empty_cache()  # the replaced weights' blocks, for the KV cache SGLang sizes next
    return fused


def _base_output_as_is(base_output: Any, x: Any) -> Any:
    return base_output  # a fused module's base GEMM already added its LoRA


def _after_init_lora_modules(result: Any, manager: Any, *args: Any, **kwargs: Any) -> None:
    layers = os.environ.get(LAYERS_ENV)
    keep = parse_layers(layers) if layers else frozenset(range(len(manager.lora_modules)))
    unwrapped = unwrap_outside(manager.base_model, manager.lora_modules, keep)
    fused = fuse_projections(manager) if _plugin_lora_backend() == "fused" else 0
    kept = sorted(i for i, modules in enumerate(manager.lora_modules) if modules)
    backend = getattr(manager, "lora_backend", None)
    # SGLang's own triton class takes prefill graphs too (for batches of <= 32 requests): only an
    # eslora class that takes them counts as this plugin's prefill graphs
    prefill_graphs = (type(backend).__name__ in LORA_BACKEND_CLASSES.values()
                      and bool(getattr(backend, "supports_prefill_cuda_graph", False)))
    report = os.environ.get(REPORT_ENV)
    if report:
        tmp = f"{report}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"kept_layers": kept, "unwrapped_modules": unwrapped, "layers": len(manager.lora_modules),
                       "lean_loads": _lean_loads(), "lora_backend": type(backend).__name__,
                       "fused_modules": fused, "prefill_graphs": prefill_graphs, "pid": os.getpid()}, f)
        os.replace(tmp, report)


def load_without_memory_queries(manager: Any, lora_ref: Any) -> Any:
    """LoRAManager.load_lora_adapter less its two log lines' free-memory queries."""
    return manager._load_lora_adapter(lora_ref)


def unload_without_memory_queries(manager: Any, lora_ref: Any) -> Any:
    """LoRAManager.unload_lora_adapter less its two log lines' free-memory queries."""
    return manager._unload_lora_adapter(lora_ref)


def register() -> None:
    """SGLang's general-plugin entry point: hook LoRAManager as the backend asked, if it did."""
    lora_backend = _plugin_lora_backend()
    if not (os.environ.get(LAYERS_ENV) or _lean_loads() or lora_backend):
        return  # (prefill graphs come with a plugin backend: the config allows them with one only)
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if lora_backend:
        use_plugin_backend(lora_backend)
    HookRegistry.register(f"{MANAGER}.init_lora_modules", _after_init_lora_modules, HookType.AFTER)  # also the report
    if _lean_loads():
        HookRegistry.register(f"{MANAGER}.load_lora_adapter", load_without_memory_queries, HookType.REPLACE)
        HookRegistry.register(f"{MANAGER}.unload_lora_adapter", unload_without_memory_queries, HookType.REPLACE)
