"""P1 (ES overhead) and P4 (adapter hand-off share) of issue 7, on one GPU, one command.

    PYTHONPATH=/tmp/site:. python3 bench/bench_sglang.py --model /tmp/model [--repeats 3] \
        [--plain] [--regroup] [key=value ...]

1. Starts the eslora SGLang backend (configs/countdown_sglang.yaml + overrides) and times whole
   ES generations: population 32 members rebuilt from seeds, 32 Countdown prompts, 256 new tokens,
   greedy (`backend.generate`, as an actor calls it). Reports wall, tokens/s, and the hand-off:
   write+load+unload seconds and the part of it the generation actually waited for (P4).
2. On the same LoRA server: the same 32 x 32 requests on the base model, in the same 256-request
   shape (LoRA-enabled server overhead without adapters).
3. --plain: stops it and starts a plain SGLang server (no --enable-lora, same other flags) and
   sends the same requests in the same shape: the P1 baseline.
4. --regroup: reruns the members in reversed order (other batch companions) and counts identical
   completions: with --enable-deterministic-inference they must all match (batch invariance,
   hence identical fitness whether batches run on one server or two).

Because greedy completions under different weights stop at different lengths, P1 is reported
both as wall-time ratio and as time per generated token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from bench.common import ROOT, generation_inputs, median, out_path, write_json  # noqa: E402
from eslora.backends import make_backend  # noqa: E402
from eslora.backends.base import Sampling  # noqa: E402
from eslora.backends.server import ServerProcess, free_port  # noqa: E402
from eslora.backends.sglang import build_command  # noqa: E402
from eslora.config import load_config  # noqa: E402
from eslora.lora import LoraSpec  # noqa: E402


def plain_command(cfg, model_path: str, port: int) -> list[str]:
    """The LoRA server's command without any LoRA flag: the same server, minus multi-LoRA."""
    cmd = build_command(cfg.backend, LoraSpec.from_config(cfg.lora), cfg.model.dtype, model_path, port)
    drop_with_values = {"--max-loras-per-batch": 1, "--max-lora-rank": 1, "--lora-backend": 1,
                        "--max-loaded-loras": 1, "--lora-target-modules": len(cfg.lora.target_modules)}
    out, i = [], 0
    while i < len(cmd):
        if cmd[i] in ("--enable-lora", "--enable-lora-overlap-loading"):
            i += 1
        elif cmd[i] in drop_with_values:
            i += 1 + drop_with_values[cmd[i]]
        else:
            out.append(cmd[i])
            i += 1
    return out


def post_generate(url: str, texts: list[str], max_new_tokens: int, forced: bool = False) -> tuple[float, int]:
    """One greedy /generate of `texts`: (seconds, generated tokens); `forced` ignores EOS (every
    completion runs to `max_new_tokens`)."""
    t0 = time.perf_counter()
    params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": forced}
    resp = requests.post(url + "/generate", json={"text": texts, "sampling_params": params}, timeout=1200)
    resp.raise_for_status()
    seconds = time.perf_counter() - t0
    return seconds, sum(int(r["meta_info"]["completion_tokens"]) for r in resp.json())


def base_generation(url: str, prompts: list[str], members: int, per_batch: int, max_new_tokens: int) -> dict:
    """members x prompts base-model requests, `per_batch` members' worth per request (eslora's shape)."""
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, members, per_batch):
        n = min(per_batch, members - start)
        _, t = post_generate(url, prompts * n, max_new_tokens)
        tokens += t
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/model")
    ap.add_argument("--config", default=str(ROOT / "configs" / "countdown_sglang.yaml"))
    ap.add_argument("--repeats", type=int, default=3, help="timed generations after one warm-up")
    ap.add_argument("--plain", action="store_true", help="also time a plain (no-LoRA) server on the same requests")
    ap.add_argument("--regroup", action="store_true", help="rerun members in reversed order and compare outputs")
    ap.add_argument("--tag", default="sglang", help="name of the JSON written under $OUT")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg = load_config(args.config, [f"model.name_or_path={args.model}", *args.overrides])
    prompts, members, task, problems = generation_inputs(cfg, args.model)
    sampling = Sampling(max_new_tokens=cfg.task.max_new_tokens, temperature=cfg.task.temperature)
    n = cfg.backend.max_loras_per_batch
    record: dict = {"config": args.config, "overrides": args.overrides, "members": len(members),
                    "prompts": len(prompts), "max_new_tokens": cfg.task.max_new_tokens, "max_loras_per_batch": n}

    backend = make_backend(cfg.backend, args.model, LoraSpec.from_config(cfg.lora), cfg.model.dtype)
    try:
        t0 = time.perf_counter()
        backend.start()
        record["lora_server_start_s"] = backend.start_seconds[0]
        record["start_plus_self_check_s"] = time.perf_counter() - t0
        record["self_check_outputs"] = backend.self_check_outputs
        runs = []
        for i in range(args.repeats + 1):
            out = backend.generate(prompts, members, sampling)
            backend.drain()  # the last unload, so each record holds its whole hand-off
            rec = dict(backend.history[-1])
            rec["handoff_total_share"] = (rec["write_s"] + rec["load_s"] + rec["unload_s"]) / rec["wall_s"]
            t1 = time.perf_counter()
            fitness = [sum(task.score(p, c.text)["reward"] for p, c in zip(problems, row)) / len(problems) for row in out]
            rec["reward_seconds"] = time.perf_counter() - t1
            rec["fitness_mean"] = sum(fitness) / len(fitness)
            rec["warmup"] = i == 0
            runs.append(rec)
            print(f"[eslora gen {i}{' warm-up' if i == 0 else ''}] wall {rec['wall_s']:.3f} s, {rec['tokens']:.0f} tok, "
                  f"{rec['tokens_per_s']:.0f} tok/s, hand-off exposed {rec['exposed_handoff_s']:.3f} s "
                  f"({100 * rec['handoff_share']:.1f}%), total {100 * rec['handoff_total_share']:.1f}%", flush=True)
        record["eslora_generations"] = runs
        timed = runs[1:]
        record["eslora_wall_s_median"] = median([r["wall_s"] for r in timed])
        record["eslora_tokens_median"] = median([r["tokens"] for r in timed])
        record["handoff_exposed_share_median"] = median([r["handoff_share"] for r in timed])
        record["handoff_total_share_median"] = median([r["handoff_total_share"] for r in timed])
        reference = [[c.text for c in row] for row in out]

        if args.regroup:
            rev = backend.generate(prompts, members[::-1], sampling)[::-1]
            backend.drain()
            same = sum(a == c.text for ref, row in zip(reference, rev) for a, c in zip(ref, row))
            record["regroup_identical"] = f"{same}/{len(members) * len(prompts)}"
            print(f"[regroup] reversed member order: {record['regroup_identical']} completions identical", flush=True)

        base_runs = [base_generation(backend.url, prompts, len(members), n, cfg.task.max_new_tokens) for _ in range(args.repeats + 1)]
        record["lora_server_base_requests"] = base_runs
        record["lora_server_base_wall_s_median"] = median([r["wall_s"] for r in base_runs[1:]])
        print(f"[LoRA server, base requests] wall {record['lora_server_base_wall_s_median']:.3f} s", flush=True)
    finally:
        backend.stop()

    if args.plain:
        port = free_port()
        server = ServerProcess(plain_command(cfg, args.model, port), port=port, name="sglang-plain")
        try:
            record["plain_server_start_s"] = server.start(timeout_s=cfg.backend.sglang.start_timeout_s)
            plain = [base_generation(server.url, prompts, len(members), n, cfg.task.max_new_tokens) for _ in range(args.repeats + 1)]
        finally:
            server.stop()
        record["plain_server"] = plain
        record["plain_wall_s_median"] = median([r["wall_s"] for r in plain[1:]])
        record["plain_tokens_median"] = median([r["tokens"] for r in plain[1:]])
        record["P1_wall_ratio"] = record["eslora_wall_s_median"] / record["plain_wall_s_median"]
        record["P1_per_token_ratio"] = (record["eslora_wall_s_median"] / record["eslora_tokens_median"]) / (
            record["plain_wall_s_median"] / record["plain_tokens_median"])
        print(f"[plain server] wall {record['plain_wall_s_median']:.3f} s; P1 wall ratio {record['P1_wall_ratio']:.3f}, "
              f"per-token ratio {record['P1_per_token_ratio']:.3f}", flush=True)

    write_json(out_path(f"bench_{args.tag}.json"), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
