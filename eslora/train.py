"""The ES driver loop, top to bottom: ask -> evaluate (Ray actors) -> tell -> log -> checkpoint.

    python -m eslora.train CONFIG [key=value ...]      (same as `eslora train`; for `ray job submit`)

The driver holds the fp32 master adapter and optimizer state. Actors get a copy once at start;
afterwards only seeds and scalars travel. Every generation appends one JSON line to
`metrics.jsonl`; a checkpoint of the last finished generation is written on any exit, so an
interrupted run loses at most the generation in flight and resumes with `resume=true` (its own
run folder) or `resume=RUN_DIR`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from eslora.checkpoint import initial_strategy, load_checkpoint, save_checkpoint
from eslora.config import Config, ConfigError, load_config, to_yaml
from eslora.evaluate import evaluate
from eslora.lora import Adapter, LoraSpec
from eslora.models import resolve_model

__all__ = ["evaluate", "load_checkpoint", "main", "run_dir", "save_checkpoint", "train"]


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) / cfg.run.name


def train(cfg: Config) -> Path:
    """Run ES as configured; returns the run folder."""
    from tqdm import tqdm

    from eslora.cluster.pool import ActorPool

    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    model_path = resolve_model(cfg.model.name_or_path)
    spec = LoraSpec.from_config(cfg.lora)
    es = initial_strategy(cfg, model_path, spec)
    if cfg.resume:
        where = out if cfg.resume.lower() == "true" else Path(cfg.resume)
        checkpoint = load_checkpoint(where)
        es.load_state_dict(checkpoint["es"])
        print(f"resumed from {where} at generation {es.generation}")
    _truncate_metrics(out / "metrics.jsonl", es.generation)

    num_params = sum(v.size for v in es.mean.values())
    print(
        f"eslora: model {model_path} | LoRA r={spec.r} on {len(es.mean) // 2} modules, {num_params:,} params | "
        f"population {cfg.es.population} x {cfg.task.num_prompts} prompts x {cfg.task.max_new_tokens} tokens | "
        f"backend {cfg.backend.name}, {cfg.cluster.num_actors or 'auto'} actor(s) | run folder {out}"
    )
    logger = MetricsLogger(out)
    with ActorPool(cfg, model_path, es.state_dict) as pool:
        initial_eval: dict[str, float] = {}
        if cfg.run.eval_every and es.generation == 0:
            # The initial mean has B = 0: this is the base model's held-out score, same problems.
            score = pool.score_adapter(es.mean, "eval", cfg.task.eval_prompts, cfg.task.eval_max_new_tokens)
            initial_eval = {f"eval_initial_{k}": v for k, v in score.parts.items()}
            print("held-out before training: " + ", ".join(f"{k} {v:.4f}" for k, v in score.parts.items()), flush=True)
        deadline = time.monotonic() + 60 * cfg.run.time_limit_min if cfg.run.time_limit_min > 0 else float("inf")
        try:
            while es.generation < cfg.run.generations:
                generation = es.generation
                failures_before = pool.failures
                population = es.ask()
                started = time.perf_counter()
                with tqdm(total=population.size, desc=f"gen {generation}", unit="member", leave=False) as bar:
                    result = pool.evaluate(population, on_batch=lambda r: bar.update(len(r.members)))
                stats = es.tell(population, result.fitness)
                drifted = pool.tell(population, result.fitness, es.fingerprint())
                record = {
                    "generation": generation,
                    "reward_mean": float(np.mean(result.fitness)),
                    "reward_max": float(np.max(result.fitness)),
                    "reward_min": float(np.min(result.fitness)),
                    "reward_std": float(np.std(result.fitness)),
                    "seconds": time.perf_counter() - started,
                    "members": population.size,
                    "tokens": int(result.tokens),
                    **{f"{k}_mean": float(np.mean([p[k] for p in result.parts])) for k in result.parts[0] if k != "reward"},
                    **{k: float(v) for k, v in stats.items() if k.startswith(("grad", "update"))},
                    **{f"backend_{k}": float(v) for k, v in result.backend_stats.items()},
                    "replicas_resynced": drifted,
                    # The queue: who did what, and what faults cost (cluster/README.md).
                    "actors": len(result.actors),
                    "per_actor": result.actors,
                    "calls_requeued": result.requeued,
                    "actor_failures": result.failures,  # during evaluation; see actor_failures_all
                    "driver_bytes_per_member": result.bytes_per_member,
                    **initial_eval,
                }
                initial_eval = {}
                if "exposed_handoff_s" in result.backend_stats and result.actors:
                    # Share of the servers' time (actors x generation wall) spent idle waiting for
                    # adapter hand-off; calls overlap on one server, so their own walls don't add up.
                    record["backend_handoff_share"] = result.backend_stats["exposed_handoff_s"] / (record["seconds"] * len(result.actors))
                # The last generation (by count or by run.time_limit_min) is always scored.
                last = generation + 1 >= cfg.run.generations or time.monotonic() >= deadline
                if cfg.run.eval_every and ((generation + 1) % cfg.run.eval_every == 0 or last):
                    score = pool.score_adapter(es.mean, "eval", cfg.task.eval_prompts, cfg.task.eval_max_new_tokens)
                    record.update({f"eval_{k}": v for k, v in score.parts.items()})
                # Actors lost anywhere in this generation: evaluation, update replay or eval.
                record["actor_failures_all"] = pool.failures - failures_before
                logger.log(record)
                if cfg.run.checkpoint_every and es.generation % cfg.run.checkpoint_every == 0:
                    save_checkpoint(out, es, cfg)
                if last and es.generation < cfg.run.generations:
                    print(f"run.time_limit_min={cfg.run.time_limit_min:g} reached after {es.generation} generations", flush=True)
                    break
        finally:
            # Nothing lost on failure: the last finished generation is always on disk.
            save_checkpoint(out, es, cfg)
            logger.close()
    adapter_dir = Adapter(name="mean", spec=spec, tensors=es.mean).save(out / "adapter", base_model=model_path)
    logger.plot(out / "curve.png")
    print(f"done: {es.generation} generations; adapter {adapter_dir}; metrics {out / 'metrics.jsonl'}")
    return out


# -- metrics -----------------------------------------------------------------------------------
class MetricsLogger:
    """metrics.jsonl (one object per generation), TensorBoard events, a one-line summary."""

    def __init__(self, out: Path) -> None:
        self.path = out / "metrics.jsonl"
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            print("tensorboard not installed: no event files written", file=sys.stderr)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "generation" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["generation"])
            self.writer.flush()
        extra = "".join(f" {k[:-5]} {record[k]:.3f}" for k in ("answer_mean", "format_mean") if k in record)
        faults = f" | {record['actor_failures_all']} actor(s) lost, {record['calls_requeued']} call(s) rerun" if record.get("actor_failures_all") else ""
        print(
            f"gen {record['generation']:4d} | reward mean {record['reward_mean']:.4f} max {record['reward_max']:.4f}"
            f"{extra} | {record['seconds']:.1f} s | {record['tokens'] / max(record['seconds'], 1e-9):.0f} tok/s"
            f" | {record.get('actors', 1)} actor(s){faults}",
            flush=True,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def plot(self, path: Path) -> Optional[Path]:
        records = read_metrics(self.path)
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
        ax.set_title(self.path.parent.name)
        ax.legend()
        if accuracy:
            ax = axes[0][1]
            ax.plot(gens, [100 * r.get("answer_mean", 0.0) for r in records], marker=marker, label="population mean accuracy (train problems)")
            if held_out("answer"):
                xs, ys = zip(*held_out("answer"))
                ax.plot(xs, [100 * y for y in ys], marker="s", label="held-out accuracy (mean adapter, greedy)")
            ax.set_xlabel("generation")
            ax.set_ylabel("accuracy (%)")
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, generation: int) -> None:
    """On a fresh start drop old lines; on resume keep only generations before the resume point."""
    records = [r for r in read_metrics(path) if r["generation"] < generation]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
