"""The trackers of run.report_to, each writing for real into a run folder (wandb offline, the
MLflow file store, TensorBoard event files), no server and no network."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eslora.tracking import TrackingError, open_trackers


def test_every_tracker_records_each_generation(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"es": {"sigma": 0.001, "population": 8}, "run": {"name": "t"}}
    trackers = open_trackers(["tensorboard", "wandb", "mlflow"], tmp_path, "t", "eslora-test", config)
    for step in range(2):
        for tracker in trackers:
            tracker.log({"reward_mean": 0.25 * step, "grad_norm": 1.5}, step)
    for tracker in trackers:
        tracker.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(0, 0.0), (1, 0.25)]

    [history] = list((tmp_path / "mlruns").rglob("metrics/reward_mean"))
    assert [line.split()[1:] for line in history.read_text().splitlines()] == [["0.0", "0"], ["0.25", "1"]]
    assert (history.parents[1] / "params" / "es.sigma").read_text() == "0.001"

    [records] = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # what `wandb sync` uploads
    data = records.read_bytes()
    assert b"reward_mean" in data and b"0.25" in data and b"sigma" in data


def test_a_tracker_that_cannot_start_is_named_with_why(tmp_path, monkeypatch):
    import wandb

    wandb.teardown()  # forget the offline settings an earlier test left in this process
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no saved login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(TrackingError, match=r"run.report_to: wandb could not start: No API key .*WANDB_MODE=offline"):
        open_trackers(["tensorboard", "wandb"], tmp_path, "t", "eslora-test", {})


def test_a_run_whose_actors_never_start_still_closes_its_trackers(tmp_path, tiny_model_path, monkeypatch):
    """The cluster cannot be reached, so the pool fails before the first generation: the MLflow
    run the driver opened is ended (FINISHED), not left RUNNING forever."""
    import socket

    import ray
    from mlflow.tracking import MlflowClient

    from eslora.cluster import ClusterError
    from eslora.train import train
    from tiny_run import tiny_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if ray.is_initialized():  # an earlier module's Ray: the driver would use it instead of joining
        ray.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    cfg = tiny_config(tiny_model_path, f"run.dir={tmp_path}", "run.name=r", "run.report_to=[mlflow]",
                      f"cluster.address={refused}", "cluster.connect_timeout_s=5")
    with pytest.raises(ClusterError, match="cannot reach the Ray cluster"):
        train(cfg)
    client = MlflowClient((tmp_path / "r" / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name(cfg.run.tracker_project).experiment_id])
    assert run.info.status == "FINISHED"
