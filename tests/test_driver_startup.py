"""What the driver refuses before Ray starts: a used run folder, a resume of another run, a bad
task, a malformed adapter, a tracker that is not installed. Each fails in seconds with a message
naming the key or file, starts no Ray and leaves every file as it was."""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import ray

from eslora.checkpoint import CheckpointError, Checkpoints, resume
from eslora.config import ConfigError, to_yaml
from eslora.evaluate import evaluate
from eslora.lora import Adapter, AdapterError, LoraSpec, adapter_shapes
from eslora.run_folder import RunFolder, RunFolderError
from eslora.startup import initial_strategy
from eslora.tasks import DatasetError
from eslora.tracking import TrackingError, check_trackers
from eslora.train import train
from test_driver_files import snapshot
from tiny_run import tiny_config


@pytest.fixture(autouse=True)
def no_ray():
    if ray.is_initialized():  # left by an earlier module: these tests must show they start none
        ray.shutdown()
    started = time.monotonic()
    yield
    assert not ray.is_initialized(), "the driver started Ray before refusing"
    assert time.monotonic() - started < 60


def config(tmp_path, model, *extra):
    return tiny_config(model, f"run.dir={tmp_path}", "run.name=r", "run.generations=2", *extra)


def written_run(tmp_path, model, *extra):
    """A run folder as a finished 1-generation run leaves it (state written without Ray)."""
    cfg = config(tmp_path, model, *extra)
    es = initial_strategy(cfg, str(model), LoraSpec.from_config(cfg.lora))
    es.tell(es.ask(), np.arange(cfg.es.population, dtype=np.float64))
    with RunFolder(tmp_path / "r", resume=False) as folder:
        folder.accept(to_yaml(cfg))
        (folder.path / "metrics.jsonl").write_text(json.dumps({"generation": 0, "reward_mean": 1.0}) + "\n")
        Checkpoints(folder.path, 1).save(es, cfg)
    return folder.path


def test_a_second_train_of_a_used_run_name_refuses_and_leaves_it_byte_identical(tmp_path, tiny_model_path):
    folder = written_run(tmp_path, tiny_model_path)
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match=f"run folder {folder} already holds a run"):
        train(config(tmp_path, tiny_model_path))
    assert snapshot(folder) == before


def test_resume_of_a_different_run_refuses_before_writing_anything(tmp_path, tiny_model_path):
    folder = written_run(tmp_path, tiny_model_path)
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=r"gen_00001\.pt was written by a different run: lora\.alpha: 2\.0 -> 3\.0; "
                                              r"es\.sigma: 0\.3 -> 0\.2\. .*resume_force=true"):
        train(config(tmp_path, tiny_model_path, "resume=true", "lora.alpha=3.0", "es.sigma=0.2"))
    assert snapshot(folder) == before  # config.yaml included: written only once a run is accepted


def test_resume_force_resumes_past_the_differences_and_says_so(tmp_path, tiny_model_path, capsys):
    folder = written_run(tmp_path, tiny_model_path)
    cfg = config(tmp_path, tiny_model_path, "resume=true", "resume_force=true", "lora.alpha=3.0")
    es = initial_strategy(cfg, str(tiny_model_path), LoraSpec.from_config(cfg.lora))
    assert resume(es, cfg, folder) == folder / "checkpoints" / "gen_00001.pt"
    assert es.generation == 1
    out = capsys.readouterr().out
    assert f"warning: resume_force=true: resuming {folder / 'checkpoints' / 'gen_00001.pt'} with lora.alpha: 2.0 -> 3.0" in out


def test_resume_true_without_a_checkpoint_names_the_folder(tmp_path, tiny_model_path):
    with pytest.raises(CheckpointError, match=f"no checkpoint in {tmp_path / 'r'}"):
        train(config(tmp_path, tiny_model_path, "resume=true"))


def test_a_bad_task_fails_in_the_driver(tmp_path, tiny_model_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError, match=f"{missing}: no such file"):
        train(config(tmp_path, tiny_model_path, "task.name=countdown", f"task.data_path={missing}"))
    assert not (tmp_path / "r" / "config.yaml").exists()
    with pytest.raises(DatasetError, match=f"{missing}: no such file"):
        evaluate(config(tmp_path, tiny_model_path, "task.name=countdown", f"task.data_path={missing}"))


def test_eval_of_a_malformed_adapter_fails_before_any_actor(tmp_path, tiny_model_path):
    spec = LoraSpec(r=1, alpha=2.0, target_modules=("q_proj",), layers=None)
    shapes = adapter_shapes(str(tiny_model_path), spec)
    name = sorted(shapes)[0]
    tensors = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    Adapter("wrong", spec, {**tensors, name: np.zeros((3, 3), np.float32)}).save(tmp_path / "wrong")
    with pytest.raises(AdapterError, match=rf"{tmp_path / 'wrong'}: the adapter does not fit .*{name} has shape \(3, 3\)"):
        evaluate(config(tmp_path, tiny_model_path, f"adapter={tmp_path / 'wrong'}"))
    Adapter("partial", spec, dict(list(tensors.items())[1:])).save(tmp_path / "partial")
    with pytest.raises(AdapterError, match=rf"the adapter does not fit .*missing {name}"):
        evaluate(config(tmp_path, tiny_model_path, f"adapter={tmp_path / 'partial'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="is not a PEFT adapter folder"):
        evaluate(config(tmp_path, tiny_model_path, f"adapter={tmp_path / 'empty'}"))


def test_a_tracker_that_is_not_installed_is_named_with_what_to_install(tmp_path):
    with pytest.raises(ConfigError, match=r"run.report_to=\['tensorbored'\]: use any of tensorboard, wandb, mlflow"):
        tiny_config("m", "run.report_to=[tensorbored]")
    # A Python where wandb cannot be imported, as on a machine without the extra.
    script = textwrap.dedent(f"""
        import sys
        class NoWandb:
            def find_spec(self, name, path=None, target=None):
                if name == "wandb":
                    raise ModuleNotFoundError("No module named 'wandb'")
        sys.meta_path.insert(0, NoWandb())
        sys.path.insert(0, {str(tmp_path)!r})
        from eslora.tracking import TrackingError, check_trackers
        try:
            check_trackers(["tensorboard", "wandb"])
        except TrackingError as err:
            print(err)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert "run.report_to names 'wandb', which is not installed: pip install 'eslora[wandb]'" in out
    check_trackers(["tensorboard", "wandb", "mlflow"])  # installed here: accepted
    with pytest.raises(TrackingError, match="unknown tracker 'neptune'"):
        check_trackers(["neptune"])
