"""The end of a run: a shippable adapter, `summary.json`, and what the run achieved, said plainly.

The summary compares the held-out scores before training (`eval_initial_*`, the base model) and
after the last generation (`eval_*`), and warns when they did not move: a run whose fitness
never varied, or whose updates did not change a greedy answer, has learned nothing that shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eslora.checkpoint import FOLDER
from eslora.config import Config
from eslora.files import write_atomic
from eslora.metrics import METRICS, held_out_scores, read_metrics
from eslora.run_folder import CONFIG

SUMMARY = "summary.json"


def finish_run(cfg: Config, out: Path, adapter_dir: Path, model_path: str, generations: int,
               trained_now: int, seconds: float) -> dict[str, Any]:
    """Make the adapter shippable (model card, tokenizer), write summary.json, print the summary."""
    from eslora.export import finish_adapter, run_card

    records = read_metrics(out / METRICS)
    before, after = held_out_scores(records)
    finish_adapter(adapter_dir, model_path, cfg.model.name_or_path, run_card(cfg, records), revision=cfg.model.revision)
    files = {name: str(out / name) for name in (METRICS, "curve.png", FOLDER, CONFIG)}
    summary = {
        "run": str(out), "generations": generations, "generations_this_session": trained_now,
        "wall_seconds": seconds, "held_out_before": before, "held_out_after": after,
        "adapter": str(adapter_dir), "files": files,
    }
    write_atomic(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    print(f"done: {generations} generations ({trained_now} in this session) in {seconds / 60:.1f} min", flush=True)
    if not before and not after:
        print("  held-out: not measured (run.eval_every=0)", flush=True)
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        change = f" ({new - old:+.4f})" if old is not None and new is not None else ""
        print(f"  held-out {key}: {_fmt(old)} -> {_fmt(new)}{change}", flush=True)
    for key in ("answer", "reward"):
        if key in before and key in after and abs(after[key] - before[key]) < 1e-12:
            print(f"warning: held-out {key} did not move ({before[key]:.4f}) over {generations} generations: "
                  "the run learned nothing measurable on held-out problems", flush=True)
    print(f"  adapter {adapter_dir} | metrics {files[METRICS]} | curve {files['curve.png']} | "
          f"summary {out / SUMMARY}", flush=True)
    return summary


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
