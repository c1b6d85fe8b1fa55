"""eslora's SGLang plugin (backend.sglang.adapter_layers_only, lean_adapter_loads) on CPU: the
unwrapping on a torch model built the way SGLang's LoRA manager leaves it, the report, the entry
point SGLang's plugin loader finds, and the per-token slots eslora's LoRA backends read. The hook
inside a real SGLang server is tested on the GPU
(tests/test_sglang_gpu.py::test_plugin_levers_serve_the_same_text)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from eslora.backends import sglang_plugin


class WithLoRA(nn.Module):
    """Shaped like SGLang's BaseLayerWithLoRA: the wrapped module is kept as `base_layer`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer


def wrapped_model(layers: int = 4) -> tuple[nn.Module, list[dict[str, nn.Module]]]:
    """A decoder-shaped model whose modules are wrapped as LoRAManager.init_lora_modules does,
    with its per-layer table {module name: LoRA module}."""
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    table: list[dict[str, nn.Module]] = []
    for i in range(layers):
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.qkv_proj = nn.Linear(4, 12)
        layer.mlp = nn.Module()
        layer.mlp.down_proj = nn.Linear(8, 4)
        model.model.layers.append(layer)
        entry = {}
        for name in (f"model.layers.{i}.self_attn.qkv_proj", f"model.layers.{i}.mlp.down_proj"):
            parent_name, _, attr = name.rpartition(".")
            wrapper = WithLoRA(model.get_submodule(name))
            setattr(model.get_submodule(parent_name), attr, wrapper)
            entry[name] = wrapper
        table.append(entry)
    return model, table


def test_layers_outside_the_kept_set_get_their_base_modules_back():
    model, table = wrapped_model(4)
    base = {name: module.base_layer for entry in table for name, module in entry.items()}
    unwrapped = sglang_plugin.unwrap_outside(model, table, frozenset({0, 2}))
    assert unwrapped == 4
    for name, module in base.items():
        layer = int(name.split(".")[2])
        served = model.get_submodule(name)
        if layer in (0, 2):
            assert isinstance(served, WithLoRA) and served.base_layer is module
        else:
            assert served is module  # the very base module: the plain path, its weights untouched
    assert [bool(entry) for entry in table] == [True, False, True, False]  # adapter loads skip them too
    with torch.no_grad():
        assert model.model.layers[1].mlp.down_proj(torch.ones(1, 8)).shape == (1, 4)


def test_the_hook_unwraps_and_reports_what_it_kept(tmp_path, monkeypatch):
    model, table = wrapped_model(5)
    report = tmp_path / "report.json"
    monkeypatch.setenv(sglang_plugin.LAYERS_ENV, sglang_plugin.format_layers([3, 0, 1, 9]))  # 9: past the model
    monkeypatch.setenv(sglang_plugin.REPORT_ENV, str(report))
    class TritonLoRABackend:  # what the report names: the class SGLang built
        supports_prefill_cuda_graph = True  # as SGLang's own: not eslora's prefill graphs

    manager = SimpleNamespace(base_model=model, lora_modules=table, lora_backend=TritonLoRABackend())  # LoRAManager's attributes it reads
    assert sglang_plugin._after_init_lora_modules(None, manager) is None  # AFTER hook: keep the result
    got = json.loads(report.read_text())
    assert got["kept_layers"] == [0, 1, 3] and got["unwrapped_modules"] == 4 and got["layers"] == 5
    assert got["lora_backend"] == "TritonLoRABackend" and got["prefill_graphs"] is False
    assert not list(tmp_path.glob("*.tmp"))
    # an eslora backend class built with ESLORA_SGLANG_PREFILL_GRAPHS=1 says so (the server's check reads it)
    class FusedLoRABackend:
        supports_prefill_cuda_graph = True

    manager.lora_backend = FusedLoRABackend()
    sglang_plugin._after_init_lora_modules(None, manager)
    got = json.loads(report.read_text())
    assert got["lora_backend"] == "FusedLoRABackend" and got["prefill_graphs"] is True
    FusedLoRABackend.supports_prefill_cuda_graph = False
    sglang_plugin._after_init_lora_modules(None, manager)
    assert json.loads(report.read_text())["prefill_graphs"] is False


def test_lean_loads_alone_keep_every_layer_and_say_so(tmp_path, monkeypatch):
    model, table = wrapped_model(3)
    report = tmp_path / "report.json"
    monkeypatch.delenv(sglang_plugin.LAYERS_ENV, raising=False)
    monkeypatch.setenv(sglang_plugin.LEAN_LOADS_ENV, "1")
    monkeypatch.setenv(sglang_plugin.REPORT_ENV, str(report))
    sglang_plugin._after_init_lora_modules(None, SimpleNamespace(base_model=model, lora_modules=table))
    got = json.loads(report.read_text())
    assert got["kept_layers"] == [0, 1, 2] and got["unwrapped_modules"] == 0 and got["lean_loads"] is True
    # the replacements do the load itself, LoRAManager's _load_lora_adapter / _unload_lora_adapter
    manager = SimpleNamespace(_load_lora_adapter=lambda ref: ("loaded", ref), _unload_lora_adapter=lambda ref: ("unloaded", ref))
    assert sglang_plugin.load_without_memory_queries(manager, "r") == ("loaded", "r")
    assert sglang_plugin.unload_without_memory_queries(manager, "r") == ("unloaded", "r")


def test_without_its_variables_the_plugin_does_nothing(monkeypatch):
    # SGLang calls every installed general plugin in every process: eslora's must not act (nor
    # import SGLang's hook registry) unless the backend asked for it.
    monkeypatch.delenv(sglang_plugin.LAYERS_ENV, raising=False)
    monkeypatch.setenv(sglang_plugin.LEAN_LOADS_ENV, "0")
    monkeypatch.delenv(sglang_plugin.LORA_BACKEND_ENV, raising=False)
    modules = set(sys.modules)
    assert sglang_plugin.register() is None
    assert not any(name.startswith("sglang") for name in set(sys.modules) - modules)


def test_layers_round_trip_through_the_variable():
    assert sglang_plugin.parse_layers(sglang_plugin.format_layers([2, 0, 1, 1])) == {0, 1, 2}
    assert sglang_plugin.format_layers(range(3)) == "0,1,2"


def test_sglang_finds_the_plugin_through_its_entry_point_group():
    # What sglang.srt.plugins.load_plugins_by_group("sglang.srt.plugins") iterates and loads.
    found = {ep.name: ep for ep in entry_points(group="sglang.srt.plugins")}
    assert "eslora" in found, "pyproject.toml's entry point is not installed (pip install -e .)"
    assert found["eslora"].load() is sglang_plugin.register


def test_an_unknown_lora_backend_in_the_variable_fails_in_the_server(monkeypatch):
    # eslora sets the variable only from a validated config; a hand-set wrong value must not be
    # taken for SGLang's own triton backend
    monkeypatch.setenv(sglang_plugin.LORA_BACKEND_ENV, "gatherd")
    with pytest.raises(ValueError, match="ESLORA_SGLANG_LORA_BACKEND='gatherd': use one of dense, gathered"):
        sglang_plugin.register()


def test_token_slots_repeat_each_requests_slot_and_pad_a_graphs_buffer_with_slot_0():
    """What the plugin's backends read as each token's adapter slot (prepare_lora_batch): eager, a
    prefill's requests of 3, 1 and 2 tokens; in a graph's static buffer, the same slots in its
    first rows (the very buffer the captured kernels read) and slot 0 in the padding rows, whatever
    an earlier, longer batch left there; a decode graph's requests of 2 tokens each."""
    request_slots = torch.tensor([2, 0, 5], dtype=torch.int32)
    lengths = torch.tensor([3, 1, 2])
    eager = sglang_plugin.token_slots(request_slots, lengths, 6)
    assert eager.tolist() == [2, 2, 2, 0, 5, 5]

    static = torch.full((10,), 7, dtype=torch.int32)  # an earlier batch's slots
    in_graph = sglang_plugin.token_slots(request_slots, lengths, 6, static)
    assert in_graph.tolist() == [2, 2, 2, 0, 5, 5]
    assert in_graph.data_ptr() == static.data_ptr()
    assert static.tolist() == [2, 2, 2, 0, 5, 5, 0, 0, 0, 0]

    decode = sglang_plugin.token_slots(request_slots, 2, 6, torch.full((8,), 7, dtype=torch.int32))
    assert decode.tolist() == [2, 2, 0, 0, 5, 5]
