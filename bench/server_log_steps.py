"""Decode steps and running batch sizes from SGLang server logs (issue 14's "what limits P1").

    python3 bench/server_log_steps.py bench/results/2026-12-02-h200/server_logs/*.log.gz \
        [--generations qwen05b_eslora_default=6 ...]

SGLang logs one `Decode batch` line every `decode_log_interval` decode steps (40 by default; read
from the log's server_args), with the running requests and the queue at that step. So lines x
interval is the server's decode steps, and with the number of generations it served (the harness
knows it: 3 fed + 3 one-call runs on the default server, 3 on the wide one), steps per generation:
a generation whose adapters fit the running set at once decodes about max_new_tokens steps; with 8
adapter slots for 32 members it decodes in rounds, one per slot refill, each as long as its longest
completion. Reads plain or gzipped logs; prints one JSON object per log.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path
from typing import Any, Optional

DECODE = re.compile(r"Decode batch, #running-req: (\d+), .*?gen throughput \(token/s\): ([\d.]+), #queue-req: (\d+)")
BATCH = re.compile(r"(Decode|Prefill) batch")
RUNNING_BUCKETS = (900, 600, 400, 200, 100, 0)  # lower bounds of the running-request ranges


def read_log(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", errors="replace") as f:
        return f.read()


def decode_steps(text: str, generations: Optional[int] = None) -> dict[str, Any]:
    """The log's decode lines summarized: steps (lines x interval), running requests per logged
    step (mean, max), the steps logged with requests queued while fewer than half the max ran
    (the slots' tail), steps per generation when `generations` is given, and the median decode
    step time by running requests (running / gen throughput, from lines whose interval held
    decode steps only: a prefill in between would count as decode time)."""
    interval = int(m.group(1)) if (m := re.search(r"decode_log_interval=(\d+)", text)) else 40
    rows, step_ms, after_decode = [], {}, False
    for line in text.splitlines():
        if not BATCH.search(line):
            continue
        decode = DECODE.search(line)
        if decode:
            running, throughput, queued = int(decode.group(1)), float(decode.group(2)), int(decode.group(3))
            rows.append((running, queued))
            if after_decode and throughput > 0:
                low = next(b for b in RUNNING_BUCKETS if running >= b)
                step_ms.setdefault(low, []).append(1000.0 * running / throughput)
        after_decode = bool(decode)
    if not rows:
        raise ValueError("no 'Decode batch' lines: not an SGLang server log, or log level above info")
    running = [r for r, _ in rows]
    lora = "enable_lora=True" in text
    slots = re.search(r"max_loras_per_batch=(\d+)", text)
    out: dict[str, Any] = {
        "lora": lora,
        "max_loras_per_batch": int(slots.group(1)) if slots and lora else None,
        "decode_log_interval": interval,
        "decode_lines": len(rows),
        "decode_steps": len(rows) * interval,
        "running_mean": sum(running) / len(running),
        "running_max": max(running),
        "tail_steps_queued_below_half": sum(1 for r, q in rows if q and r < max(running) / 2) * interval,
        "decode_step_ms_by_running": {f">={low}": {"median": sorted(v)[len(v) // 2], "lines": len(v)}
                                      for low, v in sorted(step_ms.items(), reverse=True)},
    }
    if generations:
        out["generations"] = generations
        out["decode_steps_per_generation"] = out["decode_steps"] / generations
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--generations", nargs="*", default=[], metavar="LOGNAME=N",
                    help="generations a log's server ran (LOGNAME: the file name up to .log)")
    args = ap.parse_args()
    counts = {}
    for item in args.generations:
        name, _, n = item.partition("=")
        if not n.isdigit():
            ap.error(f"--generations takes LOGNAME=N, got {item!r}")
        counts[name] = int(n)
    for path in args.logs:
        name = path.name.split(".log")[0]
        print(json.dumps({"log": name, **decode_steps(read_log(path), counts.get(name))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
