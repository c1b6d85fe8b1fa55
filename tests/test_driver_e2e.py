"""The driver on a real local Ray cluster (tiny model, hf backend): a SIGKILLed driver with
checkpoint_every=0, a checkpoint carried to another machine, callbacks, the per-generation
learning signals and the end-of-run summary. Every resume is compared bit for bit with an
uninterrupted run."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eslora.checkpoint import load_checkpoint
from eslora.config import to_yaml
from eslora.lora import load_adapter
from eslora.metrics import DROPPED, read_metrics
from eslora.train import train
from tiny_run import tiny_config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("local_ray")


def config(tmp_path, model, name, *extra):
    return tiny_config(model, f"run.dir={tmp_path}", f"run.name={name}", "run.generations=3", "run.checkpoint_every=0",
                       "es.population=4", "task.num_prompts=1", "cluster.num_actors=1", *extra)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_model_path, local_ray):
    """The uninterrupted 3-generation run every resume is compared with."""
    return train(config(tmp_path_factory.mktemp("whole"), tiny_model_path, "whole"))


def same_run(a: Path, b: Path) -> None:
    ta, tb = load_adapter(a / "adapter").tensors, load_adapter(b / "adapter").tensors
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    ma, mb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["generation"] for r in mb] == [0, 1, 2]
    assert [r["reward_mean"] for r in ma] == [r["reward_mean"] for r in mb]


def test_sigkill_with_checkpoint_every_0_resumes_at_the_last_finished_generation(tmp_path, tiny_model_path, whole):
    cfg = config(tmp_path, tiny_model_path, "killed")
    (tmp_path / "killed.yaml").write_text(to_yaml(cfg))
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "eslora.train", str(tmp_path / "killed.yaml")],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (latest.is_file() and latest.read_text() >= "gen_00001.pt"):
            assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no state of generation >= 1 in 300 s"
            time.sleep(0.01)
        driver.send_signal(signal.SIGKILL)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait()
    killed_at = int(re.fullmatch(r"gen_(\d+)\.pt", latest.read_text()).group(1))
    assert 1 <= killed_at < 3, "the driver finished before it was killed"
    assert not (tmp_path / "killed" / "adapter").exists()
    # A disk that filled mid-line as it died: the cut-off line is moved aside, never fatal.
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as f:
        f.write('{"generation": 7, "rew')
    resumed = train(config(tmp_path, tiny_model_path, "killed", "resume=true"))
    same_run(whole, resumed)
    assert '{"generation": 7, "rew' in (resumed / DROPPED).read_text()
    assert load_checkpoint(resumed)["generation"] == 3


def test_resume_from_a_checkpoint_file_copied_elsewhere_is_bit_identical(tmp_path, tiny_model_path, whole):
    part = train(config(tmp_path, tiny_model_path, "part", "run.generations=2"))
    # As a GPU allotment hands it back: the checkpoint file and metrics.jsonl, somewhere else.
    carried = tmp_path / "handed_back"
    carried.mkdir()
    shutil.copy(part / "checkpoints" / "gen_00002.pt", carried / "gen_00002.pt")
    (tmp_path / "next").mkdir()
    shutil.copy(part / "metrics.jsonl", tmp_path / "next" / "metrics.jsonl")
    resumed = train(config(tmp_path, tiny_model_path, "next", f"resume={carried / 'gen_00002.pt'}"))
    same_run(whole, resumed)


def test_a_callback_stops_the_run_which_ends_scored_checkpointed_and_summarised(tmp_path, tiny_model_path, capsys):
    seen = []

    def stop_after_first(record):
        seen.append(record["generation"])
        return record["generation"] == 0

    run = train(config(tmp_path, tiny_model_path, "cb", "run.eval_every=10", "task.eval_prompts=2",
                       "task.eval_max_new_tokens=4", "run.report_to=[tensorboard,mlflow]"), callbacks=[stop_after_first])
    assert seen == [0]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["generation"] for r in records] == [0]
    assert {"eval_initial_reward", "eval_reward", "fitness_distinct"} <= records[0].keys()
    assert records[0]["fitness_distinct"] > 1  # conciseness on 4 members: the rewards differ
    assert load_checkpoint(run)["generation"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["generations"] == 1 and summary["held_out_before"]["reward"] == records[0]["eval_initial_reward"]
    assert summary["held_out_after"]["reward"] == records[0]["eval_reward"]
    out = capsys.readouterr().out
    assert "stopped by a callback after generation 0" in out
    assert f"held-out reward: {records[0]['eval_initial_reward']:.4f} -> {records[0]['eval_reward']:.4f}" in out
    assert (run / "adapter" / "README.md").is_file()  # the model card of export.finish_adapter
    assert list((run / "mlruns").rglob("metrics/reward_mean"))


def test_no_signal_is_said_per_generation_and_at_the_end(tmp_path, tiny_model_path, capsys):
    # Countdown on a random tiny model: no member ever answers, every fitness is the same.
    run = train(config(tmp_path, tiny_model_path, "flat", "task.name=countdown", "run.generations=2", "run.eval_every=2",
                       "task.eval_prompts=2", "task.eval_max_new_tokens=4"))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["correct_completions"] for r in records] == [0, 0]
    assert [r["fitness_distinct"] for r in records] == [1, 1]
    assert all(r["update_norm"] == 0.0 for r in records)
    out = capsys.readouterr().out
    assert "warning: gen 0: all 4 members scored" in out and "the update is zero" in out
    assert re.search(r"warning: held-out answer did not move \(0\.0000\) over 2 generations", out)
