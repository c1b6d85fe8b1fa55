"""Experiment trackers a run reports its per-generation scalars to: `run.report_to`.

- `tensorboard` (default): event files in `RUN_DIR/tensorboard/`.
- `wandb` (`pip install eslora[wandb]`): a W&B run named `run.name` in project `run.tracker_project`,
  its local files under `RUN_DIR/`; `WANDB_MODE=offline` keeps it on disk (sync it later).
- `mlflow` (`pip install eslora[mlflow]`, mlflow-skinny is enough): an MLflow run in experiment
  `run.tracker_project` at `MLFLOW_TRACKING_URI`, or, if unset, a file store `RUN_DIR/mlruns/`
  (`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri RUN_DIR/mlruns` shows it).

`check_trackers` runs at start-up, before Ray, so a tracker that is named but not installed stops
the run at once with what to install.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from eslora.errors import EsloraError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> module it needs
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'eslora[wandb]'",
           "mlflow": "pip install 'eslora[mlflow]'"}


class TrackingError(EsloraError, RuntimeError):
    """A tracker named in run.report_to that is unknown or not installed."""


class Tracker(Protocol):
    def log(self, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_trackers(names: Sequence[str]) -> None:
    """Every name is a known tracker whose package is installed (TrackingError otherwise)."""
    for name in names:
        if name not in TRACKERS:
            raise TrackingError(f"run.report_to: unknown tracker {name!r}; use any of {', '.join(TRACKERS)}")
        try:
            importlib.import_module(TRACKERS[name])  # only what the config names, at start-up
        except ImportError:
            raise TrackingError(f"run.report_to names {name!r}, which is not installed: {INSTALL[name]}") from None


def open_trackers(names: Sequence[str], out: Path, run_name: str, project: str, config: Mapping[str, Any]) -> list[Tracker]:
    """One tracker per name, writing under the run folder `out` (see the module docstring)."""
    check_trackers(names)
    makers = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
    trackers: list[Tracker] = []
    for name in dict.fromkeys(names):
        try:
            trackers.append(makers[name](out, run_name, project, config))
        except Exception as err:  # the tracker's own start-up (login, store): say which, and why
            for tracker in trackers:
                tracker.close()
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise TrackingError(f"run.report_to: {name} could not start: {first}"
                                + (" (or set WANDB_MODE=offline)" if name == "wandb" else "")) from None
    return trackers


class TensorBoardTracker:
    def __init__(self, out: Path, run_name: str, project: str, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out: Path, run_name: str, project: str, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=project, name=run_name, dir=str(out), config=dict(config))

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, out: Path, run_name: str, project: str, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # The one store mlflow-skinny can write without a database; MLflow 3 asks for this opt-in.
            uri = (out / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A client of its own (not mlflow's process-wide active run): nothing leaks into user code.
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(key, str(value)[:500]) for key, value in _flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
