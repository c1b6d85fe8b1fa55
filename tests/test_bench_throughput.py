"""The CPU-checkable parts of issue 14's harness (bench/bench_throughput.py): which plain shape is
"best", the ratios, the full-weight peer's perturbation and the weights it sends, the eslora and
plain parts end to end against the stand-in SGLang server, and a failing part's isolation. The
real servers and the engine run on the GPU (scripts/gpu_throughput.sh)."""

import pytest
import torch

from bench.bench_throughput import base_weights, fed_generation, perturbed, ratios, summarize
from test_sglang_parts import PROMPTS, stand_in  # noqa: F401 - the fixture: eslora's SGLang backend on a stand-in server


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


def test_a_failing_part_is_recorded_and_the_others_still_measured(tiny_model_path, tmp_path, monkeypatch):
    """The harness's control flow on CPU. The GPU parts (servers, engine, HF loop on CUDA) cannot
    run here, so they are stand-ins with measured-looking numbers; the full-weight peer raises, as an
    engine API mismatch would on the card. Its error is recorded, every other part and ratio is
    still measured, and throughput.json on disk has it all."""
    import json
    import sys

    import bench.bench_reference as bench_reference
    import bench.bench_throughput as bt

    def eslora_runs(cfg, *a, texts=None, **k):
        lean = cfg.backend.sglang.adapter_layers_only and cfg.backend.sglang.lean_adapter_loads
        if texts is not None:  # the last run's completions, compared between the default and lean parts
            texts[:] = ["x", "y", "z", "w"] if lean else ["x", "y", "v", "w"]
        wall = 5.0 if lean else 6.0 if cfg.backend.max_loras_per_batch == 8 else 4.0
        runs = [{"load_s": 0.5 if lean else 2.0}] * 3
        return {**shape(wall, 50_000), "runs": runs, "one_call": shape(7.0, 50_000), "handoff_exposed_share": 0.02}

    monkeypatch.setattr(bt, "eslora_runs", eslora_runs)
    monkeypatch.setattr(bt, "plain_runs", lambda *a: {"shapes": {"one_call": shape(3.0, 60_000), "eslora_shape": shape(4.0, 60_000),
                                                                 "sequential_calls": shape(5.0, 60_000),
                                                                 "one_call_forced": shape(2.0, 80_000)}})

    def peer(*a):
        raise TypeError("update_weights_from_tensor() got an unexpected keyword argument 'load_format'")

    monkeypatch.setattr(bt, "fullweight_peer", peer)
    monkeypatch.setattr(bench_reference, "reference_generation", lambda *a: {"generation_s_extrapolated": 180.0})
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"tiny={tiny_model_path}", "es.population=16",
                                      "task.num_prompts=4"])  # wide: all 16 loaded, not 8
    assert bt.main() == 0  # P1 was measured

    [record] = json.loads((tmp_path / "throughput.json").read_text())
    assert "unexpected keyword argument 'load_format'" in record["fullweight_peer"]["error"]
    assert record["p2_vs_fullweight_peer"] is None
    assert record["p1_vs_best_plain"] == pytest.approx(2.0) and record["p1_vs_same_shape"] == pytest.approx(1.5)
    assert record["p1_wide_vs_best_plain"] == pytest.approx(4.0 / 3.0)
    assert record["p2_vs_hf_reference"] == pytest.approx(30.0)
    assert record["eslora_one_call"]["p1_vs_same_shape"] == pytest.approx(7.0 / 5.0)  # all members in one call vs sequential
    assert record["handoff_exposed_share"] == 0.02
    lean = record["variants"]["lean"]  # the default variant: eslora's SGLang plugin levers
    assert lean["overrides"] == bt.LEAN and lean["p1_vs_best_plain"] == pytest.approx(5.0 / 3.0)
    assert lean["speedup_vs_default"] == pytest.approx(6.0 / 5.0)
    assert lean["load_s_vs_default"] == pytest.approx(0.25)
    assert lean["same_text_share_vs_default"] == pytest.approx(0.75)
    assert record["model"] == "tiny" and record["command"].startswith("python3 bench/bench_throughput.py")


def test_the_variants_run_for_every_model_after_all_required_parts(tiny_model_path, tmp_path, monkeypatch):
    """A lease that ends early must cost the optional variants, not the second model's required
    parts: the 0.5B's variants wait until the 1.5B's parts are done."""
    import json
    import sys

    import bench.bench_throughput as bt

    order = []

    def eslora_runs(cfg, model_path, prompts, members, repeats, label, **k):
        order.append((label, cfg.model.name_or_path))
        return {**shape(5.0 if cfg.backend.sglang.adapter_layers_only else 6.0, 50_000), "runs": [{"load_s": 1.0}] * 3,
                "one_call": shape(7.0, 50_000), "handoff_exposed_share": 0.02}

    monkeypatch.setattr(bt, "eslora_runs", eslora_runs)
    monkeypatch.setattr(bt, "plain_runs", lambda *a: {"shapes": {"one_call": shape(3.0, 60_000), "eslora_shape": shape(4.0, 60_000),
                                                                 "sequential_calls": shape(5.0, 60_000)}})
    monkeypatch.setenv("OUT", str(tmp_path))
    first, second = tmp_path / "first", tmp_path / "second"
    first.symlink_to(tiny_model_path)
    second.symlink_to(tiny_model_path)
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"a={first}", "--model", f"b={second}", "--skip", "peer",
                                      "--reference-members", "0", "es.population=8", "task.num_prompts=4"])
    assert bt.main() == 0
    assert [label for label, _ in order] == ["eslora", "eslora wide"] * 2 + ["eslora lean"] * 2
    assert [path for _, path in order[-2:]] == [str(first), str(second)]
    records = json.loads((tmp_path / "throughput.json").read_text())
    assert [r["model"] for r in records] == ["a", "b"]
    assert all(r["variants"]["lean"]["p1_vs_best_plain"] == pytest.approx(5.0 / 3.0) for r in records)


def test_without_eslora_measured_p1_is_none_and_the_run_fails(tiny_model_path, tmp_path, monkeypatch):
    import json
    import sys

    import bench.bench_throughput as bt

    def no_server(*a, **k):
        raise RuntimeError("server did not become ready in 600 s")

    monkeypatch.setattr(bt, "eslora_runs", no_server)
    monkeypatch.setattr(bt, "plain_runs", lambda *a: {"shapes": {"one_call": shape(3.0, 60_000), "eslora_shape": shape(4.0, 60_000)}})
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"tiny={tiny_model_path}", "--skip", "peer",
                                      "--reference-members", "0", "es.population=8", "task.num_prompts=4"])
    assert bt.main() == 1
    [record] = json.loads((tmp_path / "throughput.json").read_text())
    assert record["eslora"]["error"].startswith("RuntimeError: server did not become ready")
    assert record["p1_vs_best_plain"] is None and record["plain"]["shapes"]["one_call"]["wall_s"] == 3.0


def test_named_variants_run_with_their_overrides_and_skipped_parts_do_not_run(tiny_model_path, tmp_path, monkeypatch):
    """A lease that measures levers only: `--skip` leaves the other parts out, each `--variant`
    runs eslora with its overrides on top of the config and is compared with the default."""
    import json
    import sys

    import bench.bench_throughput as bt

    seen = []

    def eslora_runs(cfg, model_path, prompts, members, repeats, label, **k):
        seen.append((label, cfg.backend.sglang.lora_backend, cfg.backend.max_loras_per_batch))
        wall = 4.0 if cfg.backend.sglang.lora_backend == "triton" else 6.0
        return {**shape(wall, 50_000), "runs": [{"load_s": 1.0}] * 3, "one_call": shape(7.0, 50_000),
                "handoff_exposed_share": 0.02}

    def must_not_run(*a, **k):
        raise AssertionError("a skipped part ran")

    monkeypatch.setattr(bt, "eslora_runs", eslora_runs)
    for name in ("plain_runs", "fullweight_peer"):
        monkeypatch.setattr(bt, name, must_not_run)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"tiny={tiny_model_path}",
                                      "--skip", "wide,plain,peer,reference",
                                      "--variant", "triton backend.sglang.lora_backend=triton",
                                      "--variant", "triton16 backend.sglang.lora_backend=triton backend.max_loras_per_batch=16",
                                      "backend.sglang.lora_backend=csgmv",
                                      "es.population=16", "task.num_prompts=4"])
    assert bt.main() == 1  # no plain part, so no P1
    assert seen == [("eslora", "csgmv", 8), ("eslora triton", "triton", 8), ("eslora triton16", "triton", 16)]
    [record] = json.loads((tmp_path / "throughput.json").read_text())
    assert set(record["variants"]) == {"triton", "triton16"} and "plain" not in record and "eslora_wide" not in record
    assert record["variants"]["triton16"]["overrides"] == ["backend.sglang.lora_backend=triton", "backend.max_loras_per_batch=16"]
    assert record["variants"]["triton"]["speedup_vs_default"] == pytest.approx(1.5)
    assert "p1_vs_best_plain" not in record["variants"]["triton"] and record["p1_vs_best_plain"] is None


def test_each_variant_runs_on_every_model_before_the_next_and_one_call_can_be_skipped(tiny_model_path, tmp_path,
                                                                                     monkeypatch):
    """Variants run last, in what time a lease has left: the first variant on every model comes
    before the second on any, and `--skip one_call` leaves out the default's one-call generations."""
    import json
    import sys

    import bench.bench_throughput as bt

    seen = []

    def eslora_runs(cfg, model_path, prompts, members, repeats, label, one_call=True, **k):
        seen.append((label, one_call))
        return {**shape(5.0, 50_000), "runs": [{"load_s": 1.0}] * 3, "handoff_exposed_share": 0.02}

    monkeypatch.setattr(bt, "eslora_runs", eslora_runs)
    monkeypatch.setattr(bt, "plain_runs", lambda *a: {"shapes": {"one_call": shape(3.0, 60_000),
                                                                 "eslora_shape": shape(4.0, 60_000)}})
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"a={tiny_model_path}", "--model",
                                      f"b={tiny_model_path}", "--skip", "one_call,wide,peer,reference",
                                      "--variant", "first backend.sglang.lora_backend=triton",
                                      "--variant", "second backend.sglang.lora_backend=csgmv",
                                      "es.population=16", "task.num_prompts=4"])
    assert bt.main() == 0
    assert seen == [("eslora", False), ("eslora", False), ("eslora first", False), ("eslora first", False),
                    ("eslora second", False), ("eslora second", False)]
    records = json.loads((tmp_path / "throughput.json").read_text())
    assert [r["model"] for r in records] == ["a", "b"]
    assert all(set(r["variants"]) == {"first", "second"} and "eslora_one_call" not in r for r in records)
    assert records[0]["p1_vs_best_plain"] == pytest.approx(5.0 / 3.0)


def test_a_variants_same_shape_is_plain_fed_as_the_variant_feeds(tiny_model_path, tmp_path, monkeypatch):
    """P1 against the same shape compares a variant with plain requests sent as the variant sends
    them: with 4 calls in flight its same shape is plain's 4 calls in flight, not the default's 2."""
    import json
    import sys

    import bench.bench_throughput as bt

    asked = []

    def plain_runs(cfg, model_path, prompts, repeats, other_feeds=()):
        asked.extend(other_feeds)
        return {"shapes": {"one_call": shape(3.0, 60_000), "eslora_shape": shape(4.0, 60_000),
                           "sequential_calls": shape(5.0, 60_000), bt.shape_key(8, 4, (8, 2)): shape(3.2, 60_000)}}

    monkeypatch.setattr(bt, "eslora_runs", lambda *a, **k: {**shape(6.4, 50_000), "runs": [{"load_s": 1.0}] * 3,
                                                            "one_call": shape(7.0, 50_000), "handoff_exposed_share": 0.02})
    monkeypatch.setattr(bt, "plain_runs", plain_runs)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"tiny={tiny_model_path}",
                                      "--skip", "wide,peer,reference", "--variant", "four cluster.calls_in_flight=4",
                                      "--variant", "same backend.sglang.lora_backend=triton",
                                      "es.population=16", "task.num_prompts=4", "cluster.batches_per_call=1"])
    assert bt.main() == 0
    assert bt.shape_key(8, 4, (8, 2)) == "eslora_shape_calls_of_8_4_in_flight" and bt.shape_key(8, 2, (8, 2)) == "eslora_shape"
    assert asked == [(8, 4), (8, 2)]
    [record] = json.loads((tmp_path / "throughput.json").read_text())
    assert record["variants"]["four"]["p1_vs_same_shape"] == pytest.approx(6.4 / 3.2)
    assert record["variants"]["same"]["p1_vs_same_shape"] == record["p1_vs_same_shape"] == pytest.approx(6.4 / 4.0)
    assert record["variants"]["four"]["p1_vs_best_plain"] == pytest.approx(6.4 / 3.0)


@pytest.mark.parametrize("variant, message", [
    ("triton", "NAME and then KEY=VALUE"),
    ("a=b c=d", "NAME and then KEY=VALUE"),
    ("", "NAME and then KEY=VALUE"),
    ("x backend.max_loras_per_batch", "NAME and then KEY=VALUE"),
])
def test_a_malformed_variant_is_refused_before_anything_runs(tiny_model_path, monkeypatch, capsys, variant, message):
    import sys

    import bench.bench_throughput as bt

    monkeypatch.setattr(bt, "eslora_runs", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"tiny={tiny_model_path}", "--variant", variant])
    with pytest.raises(SystemExit) as exit_info:
        bt.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_variants_parse_into_names_and_overrides_and_names_must_differ():
    from bench.bench_throughput import LEAN, parse_variants

    assert parse_variants(None, enabled=True) == [("lean", LEAN)] and parse_variants(["x a=1"], enabled=False) == []
    assert parse_variants(["w backend.sglang.extra_args=[--max-lora-chunk-size,64] es.sigma=0.01"], enabled=True) == [
        ("w", ["backend.sglang.extra_args=[--max-lora-chunk-size,64]", "es.sigma=0.01"])]
    with pytest.raises(ValueError, match="names must differ"):
        parse_variants(["a x=1", "a y=2"], enabled=True)


def test_an_unknown_part_to_skip_is_refused_naming_the_parts(tiny_model_path, monkeypatch, capsys):
    import sys

    import bench.bench_throughput as bt

    monkeypatch.setattr(bt, "eslora_runs", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"tiny={tiny_model_path}", "--skip", "peer,eslora"])
    with pytest.raises(SystemExit) as exit_info:
        bt.main()
    assert exit_info.value.code == 2 and "--skip eslora: the parts that can be left out are one_call,wide,plain,peer,reference" in capsys.readouterr().err


def test_a_variant_with_an_unknown_key_fails_before_any_server_starts(tiny_model_path, monkeypatch):
    import sys

    import bench.bench_throughput as bt

    monkeypatch.setattr(bt, "eslora_runs", lambda *a, **k: pytest.fail("a server started"))
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"tiny={tiny_model_path}",
                                      "--variant", "chunk backend.sglang.max_lora_chunk=32"])
    with pytest.raises(Exception, match="max_lora_chunk"):
        bt.main()


def test_every_timed_run_is_on_disk_while_its_part_runs_and_kept_when_it_fails(tiny_model_path, tmp_path, monkeypatch):
    """The lease can end in the middle of a part: each timed run is saved as it ends, and a part
    that fails after some runs keeps them next to its error."""
    import json
    import sys

    import bench.bench_throughput as bt

    on_disk = []

    def eslora_runs(cfg, model_path, prompts, members, repeats, label, **k):
        for i in range(2):
            bt.report_run(f"{label} {i}", {"wall_s": 5.0 + i, "tokens": 100}, warm_up=i == 0)
            on_disk.append(json.loads((tmp_path / "throughput.json").read_text())[0]["eslora"])
        raise RuntimeError("server crashed")

    monkeypatch.setattr(bt, "eslora_runs", eslora_runs)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", "--model", f"tiny={tiny_model_path}", "--no-variants",
                                      "--skip", "wide,plain,peer,reference"])
    assert bt.main() == 1
    assert [part["in_progress"] for part in on_disk] == [True, True]
    assert [len(part["runs_so_far"]) for part in on_disk] == [1, 2]
    [record] = json.loads((tmp_path / "throughput.json").read_text())
    assert record["eslora"]["error"] == "RuntimeError: server crashed"
    assert [r["label"] for r in record["eslora"]["runs_so_far"]] == ["eslora 0 warm-up", "eslora 1"]
    assert record["eslora"]["runs_so_far"][1]["wall_s"] == 6.0
    bt.report_run("after the part", {"wall_s": 1.0, "tokens": 1})  # no part running: printed only
    assert json.loads((tmp_path / "throughput.json").read_text())[0]["eslora"]["runs_so_far"][-1]["label"] == "eslora 1"


def test_a_generation_is_fed_as_an_actor_is_fed(stand_in):  # noqa: F811
    """eslora's real SGLang backend (its server a stand-in): 8 members in calls of 2, two calls at
    once; every call is one generate() of the backend, and the hand-off figures are their sums."""
    from eslora.backends.base import Sampling

    backend = stand_in()
    backend.start()
    members = [backend.random_adapter(f"m{i}", seed=i, scale=0.1) for i in range(8)]
    before = len(backend.history)
    fed = fed_generation(backend, PROMPTS, members, Sampling(max_new_tokens=4), per_call=2, in_flight=2)
    calls = backend.history[before:]
    assert (fed["calls"], len(calls)) == (4, 4) and all(c["members"] == 2 for c in calls)
    assert fed["tokens"] == 8 * len(PROMPTS) * 3  # the stand-in answers 3 tokens per prompt
    assert fed["load_s"] == pytest.approx(sum(c["load_s"] for c in calls)) and fed["load_s"] > 0
    assert 0.0 <= fed["handoff_share"] <= 1.0 and fed["wall_s"] > 0
    # the calls' exposed seconds are idle seconds within their waits, each counted by one call
    assert fed["calls_exposed_handoff_s"] <= fed["exposed_handoff_s"] + 1e-6


def test_eslora_runs_measures_both_feedings_on_one_server(stand_in, tiny_model_path, tmp_path):  # noqa: F811
    """bench's eslora part end to end on CPU: the backend built from the config, its server (the
    stand-in) started once, the generation timed as trained and as one call, then stopped."""
    from bench.bench_throughput import eslora_runs
    from eslora.config import load_config

    members = [stand_in().random_adapter(f"m{i}", seed=i, scale=0.1) for i in range(6)]  # the fixture's server is the stand-in
    cfg = load_config("configs/countdown_sglang.yaml", [
        "lora.layers=null", "backend.max_loras_per_batch=2", f"backend.sglang.adapter_dir={tmp_path / 'a'}",
        "backend.sglang.start_timeout_s=60", "es.population=6"])
    texts: list[str] = []
    out = eslora_runs(cfg, str(tiny_model_path), PROMPTS, members, repeats=1, label="test", texts=texts)
    # member by member, prompt by prompt (the stand-in answers "<weights digest>|<prompt[:8]>")
    assert len(texts) == 6 * len(PROMPTS) and [t.split("|")[1] for t in texts[:2]] == [p[:8] for p in PROMPTS]
    assert len({t.split("|")[0] for t in texts}) == 6
    assert [r["calls"] for r in out["runs"]] == [3, 3] and out["calls_in_flight"] == cfg.cluster.calls_in_flight == 2
    assert [r["calls"] for r in out["one_call"]["runs"]] == [1, 1]
    # the stand-in's completions are digests of weights and prompt: the same in every run
    assert out["same_text_share_run_to_run"] == 1.0
    assert out["tokens"] == out["one_call"]["tokens"] == 6 * len(PROMPTS) * 3
    assert out["server_start_s"] > 0 and 0.0 <= out["handoff_exposed_share"] <= 1.0
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())  # stopped: adapters gone


def test_plain_runs_time_every_shape_on_one_plain_server(stand_in, tiny_model_path):  # noqa: F811
    """bench's plain part on CPU against the stand-in server: one server, no LoRA flags, the graph
    and running limits covering the generation, three shapes x natural / forced, the same tokens."""
    from bench.bench_throughput import plain_runs
    from eslora.config import load_config

    stand_in()  # the fixture's environment: `sglang.launch_server` is the stand-in
    cfg = load_config("configs/countdown_sglang.yaml", ["backend.max_loras_per_batch=2", "es.population=6",
                                                         "backend.sglang.start_timeout_s=60"])
    # a variant feeding 4 calls of 2 members at once gets its own shape; one fed as the config is, none
    out = plain_runs(cfg, str(tiny_model_path), PROMPTS, repeats=1, other_feeds=[(2, 4), (2, 2)])
    flags = out["command_flags"]
    assert "--enable-lora" not in flags and flags[flags.index("--cuda-graph-max-bs") + 1] == str(6 * len(PROMPTS))
    assert set(out["shapes"]) == {f"{s}{f}" for s in ("one_call", "eslora_shape", "sequential_calls",
                                                      "eslora_shape_calls_of_2_4_in_flight") for f in ("", "_forced")}
    assert {s["tokens"] for s in out["shapes"].values()} == {6 * len(PROMPTS) * 3}
