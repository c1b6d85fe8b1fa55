"""The whole ES loop on a real local Ray cluster with the in-process HF backend (tiny model)."""

import json
import time

import numpy as np
import pytest
import ray
import torch

from eslora.lora import load_adapter
from eslora.checkpoint import load_checkpoint
from eslora.evaluate import evaluate
from eslora.train import train
from tiny_run import tiny_config

METRIC_KEYS = {"generation", "reward_mean", "reward_max", "reward_min", "reward_std", "seconds", "members", "tokens"}


pytestmark = pytest.mark.usefixtures("local_ray")


def config(tmp_path, model, name, *extra):
    return tiny_config(
        model, f"run.dir={tmp_path}", f"run.name={name}", "run.generations=2", "run.checkpoint_every=1",
        "es.population=6", "task.max_new_tokens=6", *extra,
    )


def test_embedded_ray_binds_loopback():
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]


def adapter_arrays(run):
    return load_adapter(run / "adapter").tensors


def test_run_writes_everything_and_adapter_loads_in_peft(tmp_path, tiny_model_path):
    run = train(config(tmp_path, tiny_model_path, "one"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [0, 1]
    assert all(METRIC_KEYS <= r.keys() for r in records)
    assert all(r["members"] == 6 and r["tokens"] > 0 for r in records)
    assert (run / "curve.png").stat().st_size > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert load_checkpoint(run)["generation"] == 2

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(run / "adapter"))
        tuned_logits = peft_model(ids).logits
    assert not torch.allclose(base_logits, tuned_logits), "the trained adapter must change the model"


def test_one_vs_three_actors_bit_identical(tmp_path, tiny_model_path):
    one = train(config(tmp_path, tiny_model_path, "a1", "cluster.num_actors=1"))
    three = train(config(tmp_path, tiny_model_path, "a3", "cluster.num_actors=3"))
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m3 = [json.loads(x) for x in (three / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in m1] == [r["reward_mean"] for r in m3]
    a1, a3 = adapter_arrays(one), adapter_arrays(three)
    assert all(np.array_equal(a1[k], a3[k]) for k in a1)
    assert any(np.any(a1[k] != 0) for k in a1 if "lora_B" in k), "the mean must have moved"


def test_resume_is_bit_identical(tmp_path, tiny_model_path):
    full = train(config(tmp_path, tiny_model_path, "full", "run.generations=3"))
    part = train(config(tmp_path, tiny_model_path, "part", "run.generations=2"))
    # The resumed leg runs on 2 actors: neither resume nor the actor count changes a bit.
    resumed = train(config(tmp_path, tiny_model_path, "part", "run.generations=3", f"resume={part}", "cluster.num_actors=2"))
    a, b = adapter_arrays(full), adapter_arrays(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    gens = [json.loads(x)["generation"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert gens == [0, 1, 2]


def test_eval_base_and_adapter(tmp_path, tiny_model_path):
    run = train(config(tmp_path, tiny_model_path, "ev", "run.generations=1"))
    base = evaluate(config(tmp_path, tiny_model_path, "ev", "task.eval_prompts=3", "task.eval_max_new_tokens=6"))
    # The adapter is scored as saved (r=1), whatever lora.* says; the caller's config is left as it was.
    cfg = config(tmp_path, tiny_model_path, "ev", "task.eval_prompts=3", "task.eval_max_new_tokens=6",
                 f"adapter={run / 'adapter'}", "lora.r=2", "lora.target_modules=[q_proj]")
    tuned = evaluate(cfg)
    assert base["problems"] == 3 and "reward" in base and "reward" in tuned
    assert cfg.lora.r == 2 and cfg.lora.target_modules == ["q_proj"]


def test_time_limit_stops_and_held_out_scores_bracket_the_run(tmp_path, tiny_model_path):
    # A limit that the first generation already passes: the run stops there, scored before and after.
    run = train(config(tmp_path, tiny_model_path, "tl", "run.generations=5", "run.time_limit_min=0.0001",
                       "run.eval_every=10", "task.eval_prompts=3", "task.eval_max_new_tokens=6"))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [0]
    assert {"eval_initial_reward", "eval_reward"} <= records[0].keys()
    # what the held-out scoring took and when the generation ended: a long run's log can be timed
    assert records[0]["held_out_initial_seconds"] > 0 and records[0]["held_out_seconds"] > 0
    assert time.strptime(records[0]["time_utc"], "%Y-%m-%dT%H:%M:%SZ")
    assert not any(k.startswith("eval_") and "seconds" in k for k in records[0])  # eval_* are scores only
    assert load_checkpoint(run)["generation"] == 1
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_held_out_score_sharded_over_actors_equals_one_actor(tmp_path, tiny_model_path):
    one = evaluate(config(tmp_path, tiny_model_path, "s1", "task.eval_prompts=5", "task.eval_max_new_tokens=6"))
    two = evaluate(config(tmp_path, tiny_model_path, "s2", "task.eval_prompts=5", "task.eval_max_new_tokens=6",
                          "cluster.num_actors=2"))
    assert one["problems"] == two["problems"] == 5
    assert two["reward"] == pytest.approx(one["reward"], abs=1e-9) and two["tokens"] == one["tokens"]
