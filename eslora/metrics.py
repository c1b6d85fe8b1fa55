"""A run's metrics: `metrics.jsonl` (one JSON object per generation), the console line, the curve.

Lines are written whole (one `write` of the full line, fsynced; a failed write is cut back), so
at worst a machine crash mid-write leaves one cut-off last line. `repair_metrics` keeps the whole
lines before a resume point and moves everything else (a cut-off line, superseded generations)
to `metrics.dropped.jsonl` beside it, saying so: nothing is lost and nothing is fatal to resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from eslora.files import append_whole, write_atomic

METRICS = "metrics.jsonl"
DROPPED = "metrics.dropped.jsonl"


class MetricsLogger:
    """Appends one record per generation to metrics.jsonl, feeds the trackers, prints one line."""

    def __init__(self, out: Path, trackers: Iterable[Any] = ()) -> None:
        self.path = out / METRICS
        self.trackers = list(trackers)
        self.last_generation: Optional[int] = None  # of the last record written by this logger

    def log(self, record: dict[str, Any]) -> None:
        append_whole(self.path, (json.dumps(record) + "\n").encode())
        self.last_generation = record["generation"]
        scalars = {k: float(v) for k, v in record.items()
                   if k != "generation" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(scalars, record["generation"])
        print(generation_line(record), flush=True)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def generation_line(record: dict[str, Any]) -> str:
    """The one console line of a generation."""
    extra = "".join(f" {k[:-5]} {record[k]:.3f}" for k in ("answer_mean", "format_mean") if k in record)
    if "correct_completions" in record:
        extra += f" | {record['correct_completions']} correct"
    faults = (f" | {record['actor_failures_all']} actor(s) lost, {record['calls_requeued']} call(s) rerun"
              if record.get("actor_failures_all") else "")
    return (
        f"gen {record['generation']:4d} | reward mean {record['reward_mean']:.4f} max {record['reward_max']:.4f}"
        f"{extra} | {record['seconds']:.1f} s | {record['tokens'] / max(record['seconds'], 1e-9):.0f} tok/s"
        f" | {record.get('actors', 1)} actor(s){faults}"
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The whole records of a metrics.jsonl (a cut-off or unreadable line is skipped, not fatal)."""
    return _parse(Path(path))[0]


def _parse(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, bad lines): a bad line is one that is not a whole JSON object with a generation."""
    if not path.is_file():
        return [], []
    records, bad = [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        if isinstance(record, dict) and isinstance(record.get("generation"), int):
            records.append(record)
        else:
            bad.append(line)
    return records, bad


def repair_metrics(path: Path, generation: int) -> None:
    """Keep the whole records of generations before `generation` (the resume point; 0 = fresh).

    Cut-off lines and records of generations that will be run again go to metrics.dropped.jsonl
    (appended), and the log says so, naming the files.
    """
    path = Path(path)
    records, bad = _parse(path)
    kept = [r for r in records if r["generation"] < generation]
    superseded = [r for r in records if r["generation"] >= generation]
    if not bad and not superseded:
        if not path.is_file():
            write_atomic(path, b"")
        return
    dropped = path.parent / DROPPED
    append_whole(dropped, "".join([line + "\n" for line in bad] + [json.dumps(r) + "\n" for r in superseded]).encode())
    if bad:
        print(f"warning: {path}: {len(bad)} cut-off or unreadable line(s) moved to {dropped}", flush=True)
    if superseded:
        print(f"{path}: {len(superseded)} record(s) of generations >= {generation} will be run again; "
              f"the old ones moved to {dropped}", flush=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def plot(metrics_path: Path, path: Path) -> Optional[Path]:
    """curve.png: population reward (mean, min-max) and held-out scores by generation."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [r["generation"] for r in records]
    accuracy = any("answer_mean" in r for r in records)  # tasks with a correct/incorrect answer
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(12 if accuracy else 7, 4), squeeze=False)
    ax = axes[0][0]
    marker = "o" if len(gens) <= 60 else None
    ax.plot(gens, [r["reward_mean"] for r in records], marker=marker, label="population mean reward")
    ax.fill_between(gens, [r["reward_min"] for r in records], [r["reward_max"] for r in records], alpha=0.2, label="min-max")

    def held_out(key: str) -> list[tuple[float, float]]:
        # eval_* is the mean after generation g's update (x = g + 1); eval_initial_* is x = 0.
        points = [(0, r[f"eval_initial_{key}"]) for r in records if f"eval_initial_{key}" in r]
        return points + [(r["generation"] + 1, r[f"eval_{key}"]) for r in records if f"eval_{key}" in r]

    if held_out("reward"):
        ax.plot(*zip(*held_out("reward")), marker="s", label="held-out reward (mean adapter, greedy)")
    ax.set_xlabel("generation")
    ax.set_ylabel("reward")
    ax.set_title(Path(metrics_path).parent.name)
    ax.legend()
    if accuracy:
        ax = axes[0][1]
        ax.plot(gens, [100 * r.get("answer_mean", 0.0) for r in records], marker=marker, label="population mean accuracy (train problems)")
        if held_out("answer"):
            xs, ys = zip(*held_out("answer"))
            ax.plot(xs, [100 * y for y in ys], marker="s", label="held-out accuracy (mean adapter, greedy)")
            base = [y for x, y in held_out("answer") if x == 0]
            if base:  # the goal is measured against the base model: draw it across the run
                ax.axhline(100 * base[0], color="gray", linestyle="--", label=f"base model, held-out ({100 * base[0]:.1f} %)")
        ax.set_xlabel("generation")
        ax.set_ylabel("accuracy (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def held_out_scores(records: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """(before, after): the base model's held-out scores and those after the last scored generation."""
    before = next(({k[len("eval_initial_"):]: v for k, v in r.items() if k.startswith("eval_initial_")}
                   for r in records if any(k.startswith("eval_initial_") for k in r)), {})
    after = next(({k[len("eval_"):]: v for k, v in r.items() if k.startswith("eval_") and not k.startswith("eval_initial_")}
                  for r in reversed(records) if any(k.startswith("eval_") and not k.startswith("eval_initial_") for k in r)), {})
    return before, after
