"""The in-process HF backend on a tiny real model: adapters in one mixed batch, PEFT files."""

import numpy as np
import pytest

from eslora.backends import make_backend
from eslora.backends.base import BackendError, CallStats, Sampling
from eslora.backends.hf import HFBackend
from eslora.config import load_config
from eslora.lora import Adapter, LoraSpec, adapter_shapes, load_adapter
from peft_reference import peft_generate

PROMPTS = ["the cat sat on", "numbers and words", "a b c"]


def random_adapter(shapes, spec, seed, scale=0.5, name=None):
    rng = np.random.default_rng(seed)
    tensors = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}
    return Adapter(name=name or f"a{seed}", spec=spec, tensors=tensors)


@pytest.fixture(scope="module")
def setup(tiny_model_path):
    cfg = load_config(None, ["backend.max_loras_per_batch=2", "lora.layers=null"])
    spec = LoraSpec.from_config(cfg.lora)
    shapes = adapter_shapes(str(tiny_model_path), spec)
    backend = make_backend(cfg.backend, str(tiny_model_path), spec, cfg.model.dtype)
    assert isinstance(backend, HFBackend)
    backend.start()
    yield cfg, spec, shapes, backend
    backend.stop()


def test_mixed_batch_matches_peft_per_adapter(setup, tiny_model_path, tmp_path):
    cfg, spec, shapes, backend = setup
    adapters = [random_adapter(shapes, spec, s) for s in (1, 2, 3)]  # 3 adapters > 2 per batch
    got = backend.generate(PROMPTS, adapters + [None], Sampling(max_new_tokens=8))
    assert len(got) == 4 and all(len(row) == len(PROMPTS) for row in got)
    texts = [[c.text for c in row] for row in got]
    assert texts[0] != texts[1] and texts[0] != texts[3], "different adapters must give different outputs"
    for adapter, row in zip(adapters[:2] + [None], [got[0], got[1], got[3]]):
        folder = None if adapter is None else adapter.save(tmp_path / adapter.name, base_model=str(tiny_model_path))
        ref = peft_generate(str(tiny_model_path), folder, PROMPTS, 8)
        assert [c.text for c in row] == [text for _, text in ref]


def test_zero_adapter_equals_base(setup):
    cfg, spec, shapes, backend = setup
    zero = Adapter("zero", spec, {k: np.zeros(s, np.float32) for k, s in shapes.items()})
    got = backend.generate(PROMPTS, [zero, None], Sampling(max_new_tokens=6))
    assert [c.text for c in got[0]] == [c.text for c in got[1]]


def test_read_only_adapter_tensors_load_without_warning_and_as_written(setup):
    """Tensors that come out of Ray's object store are read-only numpy views: the backend copies
    them (no torch warning about non-writable arrays) and serves the same adapter as writable ones."""
    import warnings

    cfg, spec, shapes, backend = setup
    adapter = random_adapter(shapes, spec, 11)
    frozen = {k: v.copy() for k, v in adapter.tensors.items()}
    for v in frozen.values():
        v.setflags(write=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not writable.*")
        got = backend.generate(PROMPTS, [Adapter("frozen", spec, frozen), adapter], Sampling(max_new_tokens=6))
    assert [c.text for c in got[0]] == [c.text for c in got[1]]


def test_saved_adapter_roundtrip(setup, tmp_path):
    cfg, spec, shapes, backend = setup
    adapter = random_adapter(shapes, spec, 7)
    folder = adapter.save(tmp_path / "ad")
    loaded = load_adapter(folder)
    assert loaded.spec == spec
    assert set(loaded.tensors) == set(adapter.tensors)
    for k in adapter.tensors:
        np.testing.assert_array_equal(loaded.tensors[k], adapter.tensors[k])


def test_bad_adapters_rejected(setup):
    cfg, spec, shapes, backend = setup
    too_big = Adapter("big", LoraSpec(r=4, alpha=2.0, target_modules=spec.target_modules, layers=None), {})
    # BackendError (not a bare ValueError): a deterministic problem, so the run stops at once.
    with pytest.raises(BackendError, match="exceeds"):
        backend.generate(PROMPTS, [too_big], Sampling(max_new_tokens=2))
    paths = Adapter("paths", LoraSpec(r=1, target_modules=("model.layers.0.self_attn.q_proj",), layers=None), {})
    with pytest.raises(BackendError, match="layers_to_transform"):
        backend.generate(PROMPTS, [paths], Sampling(max_new_tokens=2))
    other = Adapter("other", LoraSpec(r=1, target_modules=("q_proj",), layers=None), {})
    with pytest.raises(BackendError, match="differs"):
        backend.generate(PROMPTS, [other], Sampling(max_new_tokens=2))


def test_stats_are_the_call_stats_of_each_call(setup):
    """The same CallStats keys as the server backends (tests/test_server_vllm.py checks vLLM
    against this one), numbers of this call only."""
    cfg, spec, shapes, backend = setup
    adapters = [random_adapter(shapes, spec, s) for s in (4, 5, 6)]
    out = backend.generate(PROMPTS, [None, *adapters], Sampling(max_new_tokens=5))
    stats = backend.stats
    assert list(stats) == list(CallStats().as_dict())
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["members"] == 4 and stats["prompts"] == len(PROMPTS)
    assert stats["batches"] == 3  # the base row alone, then 3 adapters at 2 per batch
    assert stats["tokens"] == sum(c.num_tokens for row in out for c in row)
    assert 0 < stats["generate_s"] <= stats["wall_s"] and stats["load_s"] > 0
    assert stats["restarts"] == stats["server_start_s"] == stats["write_s"] == 0.0  # no server, no files
    backend.generate(PROMPTS[:1], adapters[:1], Sampling(max_new_tokens=2))
    assert backend.stats["members"] == 1 and backend.stats["batches"] == 1, "per call, not a running total"
    assert backend.history[-1]["tokens_per_s"] > 0


def test_unknown_dtype_is_refused_naming_the_key(tiny_model_path):
    cfg = load_config(None, [])
    with pytest.raises(BackendError, match="model.dtype='int8'"):
        HFBackend(cfg.backend, str(tiny_model_path), LoraSpec.from_config(cfg.lora), "int8")


def test_load_adapter_refuses_per_layer_paths(tmp_path):
    import json

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 2, "target_modules": ["model.layers.0.self_attn.q_proj"]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="simple module names"):
        load_adapter(tmp_path)
