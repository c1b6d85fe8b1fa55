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

It is loaded through SGLang's plugin framework (`sglang.srt.plugins`, the entry point
`eslora` in pyproject.toml), which calls `register()` early in every SGLang process
(the scheduler included); without its variables it does nothing. It reports what it did as JSON
to ESLORA_SGLANG_PLUGIN_REPORT, which the backend reads after start-up: a server whose Python
lacks the entry point (eslora not installed there) is an error there, not a silent slowdown.

Only the standard library is imported at module level: this runs inside SGLang's processes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

LAYERS_ENV = "ESLORA_SGLANG_LORA_LAYERS"
LEAN_LOADS_ENV = "ESLORA_SGLANG_LEAN_LOADS"
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


def _after_init_lora_modules(result: Any, manager: Any, *args: Any, **kwargs: Any) -> None:
    layers = os.environ.get(LAYERS_ENV)
    keep = parse_layers(layers) if layers else frozenset(range(len(manager.lora_modules)))
    unwrapped = unwrap_outside(manager.base_model, manager.lora_modules, keep)
    kept = sorted(i for i, modules in enumerate(manager.lora_modules) if modules)
    report = os.environ.get(REPORT_ENV)
    if report:
        tmp = f"{report}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"kept_layers": kept, "unwrapped_modules": unwrapped, "layers": len(manager.lora_modules),
                       "lean_loads": _lean_loads(), "pid": os.getpid()}, f)
        os.replace(tmp, report)


def load_without_memory_queries(manager: Any, lora_ref: Any) -> Any:
    """LoRAManager.load_lora_adapter less its two log lines' free-memory queries."""
    return manager._load_lora_adapter(lora_ref)


def unload_without_memory_queries(manager: Any, lora_ref: Any) -> Any:
    """LoRAManager.unload_lora_adapter less its two log lines' free-memory queries."""
    return manager._unload_lora_adapter(lora_ref)


def register() -> None:
    """SGLang's general-plugin entry point: hook LoRAManager as the backend asked, if it did."""
    if not (os.environ.get(LAYERS_ENV) or _lean_loads()):
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{MANAGER}.init_lora_modules", _after_init_lora_modules, HookType.AFTER)  # also the report
    if _lean_loads():
        HookRegistry.register(f"{MANAGER}.load_lora_adapter", load_without_memory_queries, HookType.REPLACE)
        HookRegistry.register(f"{MANAGER}.unload_lora_adapter", unload_without_memory_queries, HookType.REPLACE)
