"""eslora's SGLang plugin: LoRA kernels only on the layers the adapters train.

SGLang 0.5.17 wraps every layer's target modules with its LoRA layers and zero-fills an adapter's
missing layers, so an adapter on layers 0-9 of 24 runs the LoRA kernels (shrink + expand per
module) on all 24 on every forward. With `backend.sglang.adapter_layers_only`, the SGLang backend
sets ESLORA_SGLANG_LORA_LAYERS in the server's environment, and this plugin puts the base modules
back on the other layers once SGLang has wrapped them, so those layers run the plain path.

It is loaded through SGLang's plugin framework (`sglang.srt.plugins`, the entry point
`eslora_adapter_layers` in pyproject.toml), which calls `register()` early in every SGLang process
(the scheduler included); without the variable it does nothing. It reports what it did as JSON to
ESLORA_SGLANG_PLUGIN_REPORT, which the backend reads after start-up: a server whose Python lacks
the entry point (eslora not installed there) is an error there, not a silent slowdown.

Only the standard library is imported at module level: this runs inside SGLang's processes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

LAYERS_ENV = "ESLORA_SGLANG_LORA_LAYERS"
REPORT_ENV = "ESLORA_SGLANG_PLUGIN_REPORT"
TARGET = "sglang.srt.lora.lora_manager.LoRAManager.init_lora_modules"


def parse_layers(text: str) -> frozenset[int]:
    """"0,1,2" -> {0, 1, 2} (the variable's format; `format_layers` writes it)."""
    return frozenset(int(part) for part in text.split(",") if part.strip())


def format_layers(layers: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(set(layers)))


def unwrap_outside(model: Any, lora_modules: Sequence[dict[str, Any]], keep: frozenset[int]) -> int:
    """Put the base module back (`module.base_layer`, SGLang's LoRA layers keep it there) for every
    LoRA-wrapped module of a layer not in `keep`, and forget it in `lora_modules` (SGLang's
    per-layer {module name: LoRA module} table), so neither forwards nor adapter loads touch it.
    Returns the number of modules unwrapped."""
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


def _after_init_lora_modules(result: Any, manager: Any, *args: Any, **kwargs: Any) -> None:
    keep = parse_layers(os.environ[LAYERS_ENV])
    unwrapped = unwrap_outside(manager.base_model, manager.lora_modules, keep)
    kept = sorted(i for i, modules in enumerate(manager.lora_modules) if modules)
    report = os.environ.get(REPORT_ENV)
    if report:
        tmp = f"{report}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"kept_layers": kept, "unwrapped_modules": unwrapped,
                       "layers": len(manager.lora_modules), "pid": os.getpid()}, f)
        os.replace(tmp, report)


def register() -> None:
    """SGLang's general-plugin entry point: hook LoRAManager.init_lora_modules when asked to."""
    if not os.environ.get(LAYERS_ENV):
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _after_init_lora_modules, HookType.AFTER)
