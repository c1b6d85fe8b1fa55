"""P3 (issues 7 and 8): ES generations per hour at population 32 x k GPUs, for k = 1, 2, 4, ...

    PYTHONPATH=/tmp/site:. python3 bench/bench_scaling.py --model /tmp/model --gpus 1 2 4 [--repeats 3] [key=value ...]

One SGLang actor per GPU (configs/countdown_sglang.yaml + overrides), all started once through
`eslora.cluster.pool.ActorPool`, exactly as `eslora train` runs them. A generation at k GPUs
gives the pool's queue to the first k actors only, with population `--per-gpu` x k (the
population grows with the GPUs). With perfect scaling a generation of 32k members on k GPUs takes
as long as 32 members on one, so efficiency(k) = seconds(1) / seconds(k).

Each k runs in two modes, within the same call so the ratio is fair:
  queue:  the default, batches of max_loras_per_batch members from a queue, 2 calls in flight
          per actor (the next call's adapters load while the current one generates);
  static: each actor's whole share in one call, one call at a time (the pre-queue scheduling).

Also reports the driver <-> actor bytes per member (seeds and scalars only; constant in the
model size) and how many members each actor scored. CPU dry run (tiny model, HF backend):
    python bench/bench_scaling.py --config configs/demo.yaml --gpus 1 2 --per-gpu 4 --cpu model.name_or_path=PATH
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, out_path, write_json  # noqa: E402
from eslora.cluster.pool import ActorPool, start_local_ray  # noqa: E402
from eslora.config import load_config  # noqa: E402
from eslora.lora import LoraSpec  # noqa: E402
from eslora.models import resolve_model  # noqa: E402
from eslora.startup import initial_strategy  # noqa: E402

MODES = {"queue": {"calls_in_flight": 2, "batches_per_call": 1}, "static": {"calls_in_flight": 1, "batches_per_call": 0}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/countdown_sglang.yaml")
    parser.add_argument("--model", default="", help="model folder (sets model.name_or_path)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="actor counts to measure")
    parser.add_argument("--per-gpu", type=int, default=32, help="population members per actor")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per (k, mode), after one warm-up")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--cpu", action="store_true", help="CPU actors (dry run of the harness)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()

    most = max(args.gpus)
    overrides = list(args.overrides) + [f"cluster.num_actors={most}", f"es.population={args.per_gpu * most}"]
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    if args.cpu:
        overrides += ["cluster.gpus_per_actor=0", "backend.name=hf"]
    cfg = load_config(args.config, overrides)
    model_path = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    spec = LoraSpec.from_config(cfg.lora)
    start_local_ray()

    es = initial_strategy(cfg, model_path, spec)
    population = es.ask()  # generation 0 of the largest population; k GPUs score its first 32k members
    t0 = time.perf_counter()
    rows = []
    with ActorPool(cfg, model_path, es.state_dict) as pool:
        start_s = time.perf_counter() - t0
        print(f"{len(pool.slots)} actors up in {start_s:.1f} s", flush=True)
        everyone = list(pool.slots)
        try:
            for k in args.gpus:
                members = range(args.per_gpu * k)
                pool.actors.slots = everyone[:k]  # the queue goes to these k actors only
                for mode in args.modes:
                    for key, value in MODES[mode].items():
                        setattr(pool.cfg.cluster, key, value)
                    runs = []
                    for repeat in range(args.repeats + 1):
                        started = time.perf_counter()
                        result = pool.evaluate(population, members=members)
                        seconds = time.perf_counter() - started
                        if repeat:  # the first one warms up (CUDA graphs, caches)
                            runs.append({"seconds": seconds, "tokens": result.tokens, "bytes_per_member": result.bytes_per_member,
                                         "members_per_actor": [a["members"] for a in result.actors],
                                         "handoff_exposed_s": result.backend_stats.get("exposed_handoff_s", 0.0),
                                         "backend_wall_s": result.backend_stats.get("wall_s", 0.0)})
                    secs = median([r["seconds"] for r in runs])
                    row = {"gpus": k, "mode": mode, "population": len(members), "seconds_median": secs,
                           "seconds": [r["seconds"] for r in runs], "generations_per_hour": 3600.0 / secs,
                           "tokens_per_s": median([r["tokens"] / r["seconds"] for r in runs]),
                           "bytes_per_member": runs[-1]["bytes_per_member"], "runs": runs}
                    rows.append(row)
                    print(f"k={k} {mode:6s} population {len(members):4d}: {secs:6.2f} s/generation, "
                          f"{row['generations_per_hour']:7.0f} gen/h, {row['tokens_per_s']:8.0f} tok/s, "
                          f"members per actor {runs[-1]['members_per_actor']}, {row['bytes_per_member']:.0f} B/member", flush=True)
        finally:
            pool.actors.slots = everyone
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"] and r["gpus"] == min(args.gpus))
        # Members per second against (k / k_base) x the smallest run's members per second.
        ideal = base["population"] / base["seconds_median"] * row["gpus"] / base["gpus"]
        row["efficiency"] = row["population"] / row["seconds_median"] / ideal
    print("\n| GPUs | mode | population | s/generation (median) | generations/h | efficiency | tokens/s | bytes/member |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['gpus']} | {row['mode']} | {row['population']} | {row['seconds_median']:.2f} | {row['generations_per_hour']:.0f} | "
              f"{100 * row['efficiency']:.1f}% | {row['tokens_per_s']:.0f} | {row['bytes_per_member']:.0f} |")
    write_json(out_path("p3_scaling.json"), {"config": args.config, "overrides": overrides, "actor_start_s": start_s, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
