"""The CPU-checkable parts of issue 14's harness (bench/bench_throughput.py): which plain shape is
"best", the ratios, the full-weight peer's perturbation and the weights it sends. The servers and
the engine run on the GPU (scripts/gpu_throughput.sh)."""

import pytest
import torch

from bench.bench_throughput import base_weights, perturbed, ratios, summarize


def shape(wall: float, tokens: int) -> dict:
    return summarize([{"wall_s": 99.0, "tokens": 1}, {"wall_s": wall, "tokens": tokens}])


def test_summary_drops_the_warm_up_and_takes_medians():
    s = summarize([{"wall_s": 50.0, "tokens": 10}, {"wall_s": 3.0, "tokens": 300}, {"wall_s": 5.0, "tokens": 500},
                   {"wall_s": 4.0, "tokens": 400}])
    assert (s["wall_s"], s["tokens"]) == (4.0, 400)
    assert s["s_per_token"] == pytest.approx(0.01)


def test_best_plain_is_the_fastest_natural_stop_shape_never_a_forced_one():
    plain = {"one_call": shape(3.0, 60_000), "eslora_shape": shape(4.0, 60_000), "concurrent_calls": shape(3.5, 60_000),
             "one_call_forced": shape(2.0, 262_144)}  # forced to the limit: other completions, not a candidate
    eslora = shape(6.0, 50_000)
    r = ratios(eslora, plain, "eslora_shape")
    assert r["best_plain_shape"] == "one_call"
    assert r["p1_vs_best_plain"] == pytest.approx(2.0)
    assert r["p1_vs_same_shape"] == pytest.approx(1.5)
    # per token: eslora 120 us/token against 50 (best) and 66.7 (same shape)
    assert r["p1_vs_best_plain_per_token"] == pytest.approx(2.4)
    assert r["p1_vs_same_shape_per_token"] == pytest.approx(1.8)


def test_peer_perturbation_is_the_members_own_and_keeps_names_shapes_dtypes():
    base = {"a.weight": torch.zeros(64, 32, dtype=torch.bfloat16), "b.bias": torch.ones(4096, dtype=torch.float32)}
    one, again, other = perturbed(base, 3, 1e-2), perturbed(base, 3, 1e-2), perturbed(base, 4, 1e-2)
    assert [n for n, _ in one] == list(base)
    for (name, w), (_, w2), (_, w3) in zip(one, again, other):
        assert w.dtype == base[name].dtype and w.shape == base[name].shape
        assert torch.equal(w, w2)  # a member's weights are rebuilt from its seed alone
        assert not torch.equal(w, w3)
        noise = (w.float() - base[name].float())
        assert 0.008 < float(noise.std()) < 0.012  # sigma * N(0, 1)
    assert torch.equal(base["a.weight"], torch.zeros(64, 32, dtype=torch.bfloat16))  # the base is untouched


def test_peer_sends_the_weights_under_the_names_the_model_loads(tiny_model_path):
    from transformers import AutoModelForCausalLM

    weights = base_weights(str(tiny_model_path), device="cpu")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path))
    state = model.state_dict()
    assert weights and set(weights) <= set(state)
    assert all(tuple(w.shape) == tuple(state[n].shape) for n, w in weights.items())
    # every parameter the model has is perturbed (tied embeddings are one tensor, stored once)
    assert {n for n, _ in model.named_parameters()} <= set(weights)


def test_inplace_loader_perturbs_every_weight_from_the_seed_and_restores(tiny_model_path):
    import importlib

    from transformers import AutoModelForCausalLM

    from bench.inplace_perturb import LOADER

    module, _, name = LOADER.rpartition(".")  # how SGLang's dynamic_import resolves the path
    loader = getattr(importlib.import_module(module), name)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path), dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader(model, [("seed_scale", torch.tensor([7, 1e-2], dtype=torch.float64))])
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(not torch.equal(moved[n], before[n]) for n in before)
    assert all(0.008 < float((moved[n] - before[n]).std()) < 0.012 for n in before if before[n].numel() > 1000)
    loader(model, [("seed_scale", torch.tensor([7, -1e-2], dtype=torch.float64))])
    assert all(torch.allclose(p, before[n], atol=1e-6) for n, p in model.named_parameters())
    loader(model, [("seed_scale", torch.tensor([7, 1e-2], dtype=torch.float64))])  # the same member again
    assert all(torch.allclose(p, moved[n], atol=1e-6) for n, p in model.named_parameters())
