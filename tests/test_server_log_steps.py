"""bench/server_log_steps.py on the server logs the throughput harness brought back from the H200
(bench/results/2026-12-02-h200/server_logs/): the numbers docs/benchmarks.md quotes for P1."""

from pathlib import Path

import pytest

from bench.server_log_steps import decode_steps, read_log

LOGS = Path(__file__).resolve().parents[1] / "bench" / "results" / "2026-12-02-h200" / "server_logs"


def test_step_times_come_from_decode_only_intervals():
    """running / gen throughput is the step time, unless a prefill ran inside the interval."""
    decode = "Decode batch, #running-req: {r}, #token: 1, cuda graph: True, gen throughput (token/s): {t}, #queue-req: 0"
    text = "\n".join([decode.format(r=1000, t=100000.0),  # the first: its interval may hold anything
                      decode.format(r=1000, t=125000.0),  # 8 ms per step
                      "Prefill batch, #new-seq: 8, #new-token: 8192, #cached-token: 0",
                      decode.format(r=300, t=1000.0),  # after a prefill: not a step time
                      decode.format(r=300, t=100000.0)])  # 3 ms
    out = decode_steps(text)
    assert out["decode_step_ms_by_running"] == {">=900": {"median": 8.0, "lines": 1}, ">=200": {"median": 3.0, "lines": 1}}


def test_decode_lines_are_counted_and_read_as_the_logs_say():
    text = read_log(LOGS / "qwen05b_eslora_default.log.gz")
    lines = [line for line in text.splitlines() if "Decode batch" in line]
    running = [int(line.split("#running-req: ")[1].split(",")[0]) for line in lines]
    out = decode_steps(text, generations=6)
    assert out["decode_lines"] == len(lines) and out["decode_steps"] == 40 * len(lines)
    assert out["running_max"] == max(running) == 256  # 8 adapter slots x 32 prompts
    assert out["running_mean"] == pytest.approx(sum(running) / len(running))
    assert out["max_loras_per_batch"] == 8 and out["lora"]


def test_eight_slots_decode_four_times_the_steps_of_all_members_at_once():
    """The measurement behind P1's first factor: 32 members through 8 slots decode in rounds."""
    default = decode_steps(read_log(LOGS / "qwen15b_eslora_default.log.gz"), generations=6)
    wide = decode_steps(read_log(LOGS / "qwen15b_eslora_wide.log.gz"), generations=3)
    assert wide["running_max"] == 1024 and wide["decode_steps_per_generation"] <= 256 + 40  # one round: the token limit
    assert default["decode_steps_per_generation"] / wide["decode_steps_per_generation"] > 3.5


def test_the_interval_comes_from_the_log_and_a_file_without_decode_lines_is_refused():
    text = ("server_args=ServerArgs(enable_lora=False, decode_log_interval=10)\n"
            "[t] Decode batch, #running-req: 7, #token: 1, cuda graph: True, gen throughput (token/s): 1.0, #queue-req: 3\n")
    out = decode_steps(text)
    assert (out["decode_steps"], out["running_max"], out["max_loras_per_batch"]) == (10, 7, None)
    assert out["decode_step_ms_by_running"] == {}  # a step time needs an interval of decode steps only
    with pytest.raises(ValueError, match="no 'Decode batch' lines"):
        decode_steps("Prefill batch, #new-seq: 1")
