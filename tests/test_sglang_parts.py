"""The SGLang backend's pure parts, on CPU: the server command line and hand-off accounting.
(The backend itself runs against a real server in tests/test_sglang_gpu.py.)"""

import pytest

from eslora.backends.sglang import build_command, uncovered
from eslora.config import load_config


def test_command_binds_loopback_and_names_lora_limits():
    cfg = load_config("configs/countdown_sglang.yaml", ["lora.r=2", "lora.target_modules=[q_proj,v_proj]"])
    cmd = build_command(cfg, "/models/m", 31000)
    joined = " ".join(cmd)
    assert "--host 127.0.0.1 --port 31000" in joined
    assert "--max-loras-per-batch 8" in joined and "--max-lora-rank 2" in joined
    assert cmd[cmd.index("--lora-target-modules") + 1 : cmd.index("--lora-target-modules") + 3] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "start, end, intervals, expected",
    [
        (0.0, 1.0, [], 1.0),  # nothing generating: the whole wait is exposed
        (0.0, 1.0, [(-1.0, 2.0)], 0.0),  # hidden behind another call's generation
        (0.0, 1.0, [(0.2, 0.5)], 0.7),
        (0.0, 1.0, [(0.2, 0.5), (0.4, 0.6), (0.9, 3.0)], 0.5),  # overlapping intervals count once
        (0.0, 1.0, [(1.5, 2.0), (-2.0, -1.0)], 1.0),  # outside the wait
    ],
)
def test_exposed_wait_excludes_time_hidden_by_generation(start, end, intervals, expected):
    assert uncovered(start, end, intervals) == pytest.approx(expected)
