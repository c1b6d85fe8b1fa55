"""The ES driver loop, top to bottom: ask -> evaluate (Ray actors) -> tell -> log -> checkpoint.

    python -m eslora.train CONFIG [key=value ...]      (same as `eslora train`; for `ray job submit`)

The driver holds the fp32 master adapter and optimizer state. Actors get a copy once at start;
afterwards only seeds and scalars travel. Before any actor starts the driver checks what it can
(trackers installed, run folder free, model, task, checkpoint and its config). Every generation
appends one JSON line to `metrics.jsonl` and writes the ES state (`eslora.checkpoint`), so an
interrupted run loses at most the generation in flight and resumes bit-identically with
`resume=true` (its own run folder), `resume=RUN_DIR` or `resume=FILE.pt`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from eslora import FunctionModule
from eslora.checkpoint import Checkpoints, resume
from eslora.config import Config, to_dict, to_yaml
from eslora.es import EvolutionStrategy
from eslora.lora import Adapter, LoraSpec
from eslora.metrics import METRICS, MetricsLogger, plot, repair_metrics
from eslora.models import resolve_model
from eslora.run_folder import RunFolder
from eslora.startup import build_task, initial_strategy
from eslora.summary import finish_run
from eslora.tracking import check_trackers, open_trackers

if TYPE_CHECKING:
    from eslora.cluster.pool import ActorPool, GenerationResult

__all__ = ["run_dir", "train"]

Callback = Callable[[dict[str, Any]], Any]  # called with each generation's record; True stops the run


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) / cfg.run.name


def train(cfg: Config, callbacks: Sequence[Callback] = ()) -> Path:
    """Run ES as configured; returns the run folder.

    `callbacks`: functions called with each generation's metrics record (the dict written to
    metrics.jsonl, before it is written); one returning True stops the run after that
    generation, which is then held-out scored (if `run.eval_every`), checkpointed and finished
    like a last generation.
    """
    from eslora.cluster.pool import ActorPool

    started = time.monotonic()
    check_trackers(cfg.run.report_to)
    with RunFolder(run_dir(cfg), resume=bool(cfg.resume)) as folder:
        out = folder.path
        model_path = resolve_model(cfg.model.name_or_path, cfg.model.revision)
        build_task(cfg, model_path)
        spec = LoraSpec.from_config(cfg.lora)
        es = initial_strategy(cfg, model_path, spec)
        if cfg.resume:
            resume(es, cfg, out)
        folder.accept(to_yaml(cfg))
        repair_metrics(out / METRICS, es.generation)
        first_generation = es.generation

        num_params = sum(v.size for v in es.mean.values())
        print(
            f"eslora: model {model_path} | LoRA r={spec.r} on {len(es.mean) // 2} modules, {num_params:,} params | "
            f"population {cfg.es.population} x {cfg.task.num_prompts} prompts x {cfg.task.max_new_tokens} tokens | "
            f"backend {cfg.backend.name}, {cfg.cluster.num_actors or 'auto'} actor(s) | run folder {out}",
            flush=True,
        )
        logger = MetricsLogger(out, open_trackers(cfg.run.report_to, out, cfg.run.name, cfg.run.tracker_project, to_dict(cfg)))
        checkpoints = Checkpoints(out, cfg.run.checkpoint_every)
        try:  # the trackers are closed even when the pool cannot start
            with ActorPool(cfg, model_path, es.state_dict) as pool:
                try:
                    _loop(cfg, es, pool, logger, checkpoints, callbacks)
                except BaseException:
                    _save_after_failure(checkpoints, logger, es, cfg)  # the last finished generation stays on disk
                    raise
                checkpoints.save(es, cfg, keep=True)
        finally:
            logger.close()
        adapter_dir = Adapter(name="mean", spec=spec, tensors=es.mean).save(out / "adapter", base_model=model_path)
        plot(out / METRICS, out / "curve.png")
        finish_run(cfg, out, adapter_dir, model_path, es.generation, es.generation - first_generation,
                   time.monotonic() - started)
    return out


def _loop(cfg: Config, es: EvolutionStrategy, pool: "ActorPool", logger: MetricsLogger, checkpoints: Checkpoints,
          callbacks: Sequence[Callback]) -> None:
    from tqdm import tqdm

    initial_eval: dict[str, float] = {}
    if cfg.run.eval_every and es.generation == 0:
        # The initial mean has B = 0: this is the base model's held-out score, same problems.
        base = _score_into(initial_eval, pool, es, cfg, initial=True)
        print("held-out before training: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()), flush=True)
    deadline = time.monotonic() + 60 * cfg.run.time_limit_min if cfg.run.time_limit_min > 0 else float("inf")
    while es.generation < cfg.run.generations:
        generation = es.generation
        failures_before = pool.failures
        population = es.ask()
        started = time.perf_counter()
        with tqdm(total=population.size, desc=f"gen {generation}", unit="member", leave=False) as bar:
            result = pool.evaluate(population, on_batch=lambda r: bar.update(len(r.members)))
        stats = es.tell(population, result.fitness)
        drifted = pool.tell(population, result.fitness, es.fingerprint())
        record = generation_record(cfg, generation, result, stats, time.perf_counter() - started)
        record["replicas_resynced"] = drifted
        record.update(initial_eval)
        initial_eval = {}
        if record["fitness_distinct"] == 1:
            print(f"warning: gen {generation}: all {population.size} members scored {record['reward_mean']:.6g}: "
                  "no fitness variance, so the update is zero (nothing learned from this generation)", flush=True)
        # The last generation (by count or by run.time_limit_min) is always scored.
        last = generation + 1 >= cfg.run.generations or time.monotonic() >= deadline
        scored = bool(cfg.run.eval_every) and ((generation + 1) % cfg.run.eval_every == 0 or last)
        if scored:
            _score_into(record, pool, es, cfg)
        try:
            stop = any([bool(callback(record)) for callback in callbacks])  # every callback sees every record
        except BaseException:
            logger.log(record)  # the generation is done: keep its line, then fail
            raise
        if stop and cfg.run.eval_every and not scored:  # a stop makes this the last generation
            _score_into(record, pool, es, cfg)
        # Actors lost anywhere in this generation: evaluation, update replay or eval.
        record["actor_failures_all"] = pool.failures - failures_before
        record["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # when the generation was done
        logger.log(record)
        checkpoints.save(es, cfg)
        if stop:
            print(f"stopped by a callback after generation {generation}", flush=True)
            return
        if last and es.generation < cfg.run.generations:
            print(f"run.time_limit_min={cfg.run.time_limit_min:g} reached after {es.generation} generations", flush=True)
            return


def generation_record(cfg: Config, generation: int, result: "GenerationResult", stats: dict[str, float],
                      seconds: float) -> dict[str, Any]:
    """The metrics of one generation (metrics.jsonl's keys; cluster/README.md for the queue's)."""
    fitness = np.asarray(result.fitness, dtype=np.float64)
    record: dict[str, Any] = {
        "generation": generation,
        "reward_mean": float(np.mean(fitness)),
        "reward_max": float(np.max(fitness)),
        "reward_min": float(np.min(fitness)),
        "reward_std": float(np.std(fitness)),
        # 1 = every member scored the same: shaping gives zero weights, the step is zero.
        "fitness_distinct": int(np.unique(fitness).size),
        "seconds": seconds,
        "members": len(fitness),
        "tokens": int(result.tokens),
        **{f"{k}_mean": float(np.mean([p[k] for p in result.parts])) for k in result.parts[0] if k != "reward"},
        **{k: float(v) for k, v in stats.items() if k.startswith(("grad", "update"))},
        **{f"backend_{k}": float(v) for k, v in result.backend_stats.items()},
        "actors": len(result.actors),
        "per_actor": result.actors,
        "calls_requeued": result.requeued,
        "actor_failures": result.failures,  # during evaluation; see actor_failures_all
        "driver_bytes_per_member": result.bytes_per_member,
    }
    if "answer" in result.parts[0]:
        # `answer` is each member's share of correct answers over the generation's prompts.
        record["correct_completions"] = int(round(sum(p["answer"] for p in result.parts) * cfg.task.num_prompts))
    if result.actors:
        # Share of the servers' time (actors x generation wall) spent idle waiting for adapter
        # hand-off: calls overlap on one server, so their walls don't add up, but their exposed
        # seconds do (a backend counts an idle second for one call only).
        record["backend_handoff_share"] = result.backend_stats["exposed_handoff_s"] / (seconds * len(result.actors))
    return record


def _score_into(record: dict[str, Any], pool: "ActorPool", es: EvolutionStrategy, cfg: Config,
                initial: bool = False) -> dict[str, float]:
    """The mean adapter's greedy held-out scores into `record` as eval_* (eval_initial_*: the base model,
    before training), and what scoring them took (not an eval_* key: those are the scores).
    Returns the scores."""
    t0 = time.perf_counter()
    scores = pool.score_adapter(es.mean, "eval", cfg.task.eval_prompts, cfg.task.eval_max_new_tokens).parts
    prefix = "eval_initial_" if initial else "eval_"
    record.update({f"{prefix}{k}": v for k, v in scores.items()})
    record["held_out_initial_seconds" if initial else "held_out_seconds"] = time.perf_counter() - t0
    return scores


def _save_after_failure(checkpoints: Checkpoints, logger: MetricsLogger, es: EvolutionStrategy, cfg: Config) -> None:
    """Keep the newest state that matches metrics.jsonl: a generation whose line was written but
    whose state was not (the save failed) is saved again; one not logged yet was in flight."""
    if logger.last_generation == es.generation - 1 and checkpoints.saved_generation != es.generation:
        try:
            checkpoints.save(es, cfg, keep=True)
        except Exception as err:  # e.g. the disk is still full: report it, keep the original error
            print(f"warning: the state of generation {es.generation} was not saved: {err}", file=sys.stderr, flush=True)
    checkpoints.keep_latest()


sys.modules[__name__].__class__ = FunctionModule  # `from eslora import train` may give this module: it calls train

if __name__ == "__main__":
    # `python -m eslora.train ...` (what `ray job submit` runs) is `python -m eslora train ...`: the
    # command line owns argv. Run through the package's entry point, so this module never imports
    # the CLI that imports it.
    import runpy

    sys.argv.insert(1, "train")
    runpy.run_module("eslora", run_name="__main__")
