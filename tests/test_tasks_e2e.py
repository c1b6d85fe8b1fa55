"""`eslora train` end to end on a task the user brings (examples/), from the clone, on the CPU
default (real Ray, the in-process HF backend, the tiny model): a task in a file outside eslora/
gives identical adapters with 1 and 3 actors, and the generic prompts task trains from a jsonl
file with TRL-style reward functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from eslora.lora import load_adapter

ROOT = Path(__file__).resolve().parent.parent
ESLORA = Path(sys.executable).with_name("eslora")  # the console script, as a user runs it


def eslora_train(config: str, model: Path, run_dir: Path, name: str, *extra: str) -> Path:
    command = [str(ESLORA)] if ESLORA.is_file() else [sys.executable, "-m", "eslora.cli"]
    args = [*command, "train", config, f"model.name_or_path={model}", f"run.dir={run_dir}", f"run.name={name}",
            "run.generations=2", "run.eval_every=0", "run.checkpoint_every=0", "lora.layers=null", "es.population=8",
            "es.sigma=0.3", "es.lr=0.05", "task.max_new_tokens=6", "backend.max_loras_per_batch=2",
            "cluster.cpus_per_actor=0.5", *extra]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir / name


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_own_task_file_one_vs_three_actors_identical(tmp_path: Path, tiny_model_path: Path) -> None:
    one = eslora_train("examples/my_task.yaml", tiny_model_path, tmp_path, "a1", "cluster.num_actors=1")
    three = eslora_train("examples/my_task.yaml", tiny_model_path, tmp_path, "a3", "cluster.num_actors=3")
    m1, m3 = metrics(one), metrics(three)
    assert [r["reward_mean"] for r in m1] == [r["reward_mean"] for r in m3]
    assert m3[0]["actors"] == 3 and m1[0]["actors"] == 1
    a1, a3 = load_adapter(one / "adapter").tensors, load_adapter(three / "adapter").tensors
    assert all(np.array_equal(a1[k], a3[k]) for k in a1)
    assert any(np.any(a1[k] != 0) for k in a1 if "lora_B" in k), "the mean must have moved"


def test_prompts_task_trains_from_jsonl_with_trl_rewards(tmp_path: Path, tiny_model_path: Path) -> None:
    run = eslora_train("examples/prompts.yaml", tiny_model_path, tmp_path, "prompts", "cluster.num_actors=1")
    records = metrics(run)
    assert [r["generation"] for r in records] == [0, 1]
    # Each reward function's mean is logged beside the weighted sum.
    assert {"mentions_answer_mean", "brevity_mean", "answer_mean"} <= records[0].keys()
    tensors = load_adapter(run / "adapter").tensors
    assert any(np.any(tensors[k] != 0) for k in tensors if "lora_B" in k), "the mean must have moved"
