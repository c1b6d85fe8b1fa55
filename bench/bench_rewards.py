"""Speed targets of issue 4 for the Countdown rewards (CPU only, seconds to run):

* every completion up to 100 KB scored in under 10 ms;
* longer ones in linear time: a 10 MB string in under 100 ms.

    .venv/bin/python bench/bench_rewards.py [--repeats 5] [--json out.json]

Scores each case with both public rewards (`es_paper_reward` + `tinyzero_reward`, i.e. two full
scorings), reports the median (judged against the target) and the worst of `--repeats` runs per
case (the worst is mostly scheduler noise on a shared box), the time per MB at 1/2/4/8 MB (linear
means flat), and, for contrast, the published regex + filter approach on a small adversarial
input (the regexes go quadratic; `eval` would not return at all on `99**80**50**2`, so it is not
run). Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eslora.tasks.countdown import es_paper_reward, tinyzero_reward  # noqa: E402

NUMS, TARGET = [44, 19, 35, 7], 91
KB, MB = 1024, 1024 * 1024


def _fit(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def cases(size: int) -> dict[str, str]:
    rng = random.Random(size)
    frags = ["<think>", "</think>", "<answer>", "</answer>", "\n", "44", "(", ")", "**", " ", "x", "+"]
    think = _fit("Let me try 44 + 19 = 63, then 63 + 35 = 98, no. ", size - 60)
    return {
        "realistic think + answer": think + "</think>\n<answer>(44 + 19) + 35 - 7</answer>",
        "random tag fragments": "".join(rng.choice(frags) for _ in range(size // 3))[:size],
        "unclosed <answer> x N": _fit("<answer>", size),
        "</think>\\n<answer></answer>x x N": _fit("</think>\n<answer></answer>x", size),
        "<answer>1</answer> x N": _fit("<answer>1</answer>", size),
        "answer of '(' x N": "<answer>" + "(" * (size - 17) + "</answer>",
        "answer of 9** x N": "<answer>" + _fit("9**", size - 18) + "9</answer>",
        "NUL bytes": "\x00" * size,
        "unicode digits": _fit("٣", size),
        "__import__ in answer": _fit("<answer>__import__('os').system('echo pwned')</answer>", size),
    }


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, worst) seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], times[-1]


def score(text: str) -> None:
    es_paper_reward(text, NUMS, TARGET)
    tinyzero_reward(text, NUMS, TARGET)


def published_regex_scan(text: str) -> None:
    """The published format + answer regexes (without eval), for contrast."""
    re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", "<think>" + text, re.DOTALL)
    re.search(r"<answer>.*?<\/answer>", text, re.DOTALL)
    re.findall(r"<answer>(.*?)<\/answer>", text, re.DOTALL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    record: dict = {"targets": {"100KB_ms": 10.0, "10MB_ms": 100.0}}
    ok = True

    for label, size, limit_ms in (("100KB", 100 * KB, 10.0), ("10MB", 10 * MB, 100.0)):
        print(f"\n{label} completions, median and worst of {args.repeats} (target: median < {limit_ms:g} ms)")
        rows = {}
        for name, text in cases(size).items():
            med, worst = (1000 * x for x in timed(lambda: score(text), args.repeats))
            rows[name] = {"median_ms": round(med, 3), "worst_ms": round(worst, 3)}
            flag = "ok" if med < limit_ms else "MISSED"
            ok &= med < limit_ms
            print(f"  {name:36s} {med:9.3f} ms  (worst {worst:9.3f})  {flag}")
        record[label] = rows

    print("\nlinearity: median ms per MB at 1, 2, 4, 8 MB (flat = linear)")
    per_mb = {}
    for name in ("realistic think + answer", "unclosed <answer> x N", "</think>\\n<answer></answer>x x N",
                 "answer of '(' x N"):
        line = []
        for mbs in (1, 2, 4, 8):
            text = cases(mbs * MB)[name]
            med, _ = timed(lambda: score(text), args.repeats)
            line.append(round(1000 * med / mbs, 3))
        per_mb[name] = line
        print(f"  {name:36s} " + "  ".join(f"{x:7.3f}" for x in line))
    record["ms_per_MB_at_1_2_4_8MB"] = per_mb

    print("\ncontrast: the published regexes on 'unclosed <answer> x N' (quadratic)")
    contrast = {}
    for kb in (8, 16, 32):
        text = _fit("<answer>", kb * KB)
        ms_ref = 1000 * timed(lambda: published_regex_scan(text), 1)[0]
        ms_ours = 1000 * timed(lambda: score(text), 3)[0]
        contrast[f"{kb}KB"] = {"published_regex_ms": round(ms_ref, 2), "eslora_ms": round(ms_ours, 3)}
        print(f"  {kb:3d} KB: published regexes {ms_ref:9.2f} ms   eslora {ms_ours:7.3f} ms")
    record["contrast"] = contrast
    record["all_targets_met"] = ok

    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
