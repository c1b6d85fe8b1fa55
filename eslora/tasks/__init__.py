"""Tasks: datasets, prompts and rewards (nothing of ES or serving).

`make_task(cfg.task, tokenizer)` builds the task a config names: "countdown" (the ES paper's
and TinyZero's Countdown, `eslora.tasks.countdown`) or "conciseness" (the ES paper's length
task, `eslora.tasks.conciseness`). See docs/tasks.md.
"""

from __future__ import annotations

from typing import Any

from eslora.tasks.base import Problem, Task, accuracy
from eslora.tasks.conciseness import ConcisenessTask
from eslora.tasks.countdown import CountdownTask, DatasetError

__all__ = ["Problem", "Task", "accuracy", "make_task", "CountdownTask", "ConcisenessTask", "DatasetError",
           "TASKS", "validate_config"]

TASKS = ("countdown", "conciseness")


def make_task(cfg: Any, tokenizer: Any = None) -> Task:
    """The task of a `TaskConfig` (cfg.name, template, reward, data_path, data_seed, target_length).

    `tokenizer`: a HF tokenizer; its chat template renders prompts when cfg.template == "chat".
    With None, or a tokenizer without a chat template, prompts use the plain
    "<system>\\nUser: ...\\nAssistant: ..." layout (see eslora.tasks.base.plain_chat).
    """
    name = str(cfg.name).strip().lower()
    if name == "countdown":
        return CountdownTask.from_config(cfg, tokenizer)
    if name == "conciseness":
        if cfg.data_path:
            raise ValueError(f"task.data_path={cfg.data_path!r}: the conciseness task ships its own questions")
        return ConcisenessTask.from_config(cfg, tokenizer)
    raise ValueError(f"task.name={cfg.name!r}: unknown task; use one of {', '.join(TASKS)}")


def validate_config(cfg: Any) -> None:
    """The `task` section's value rules (raises ValueError naming the key); `load_config` calls it."""
    name = str(cfg.name).strip().lower()
    checks = [
        (name in TASKS, f"task.name={cfg.name!r}: unknown task; use one of {', '.join(TASKS)}"),
        (cfg.num_prompts >= 1, "task.num_prompts must be >= 1"),
        (cfg.max_new_tokens >= 1, "task.max_new_tokens must be >= 1"),
        (cfg.eval_prompts >= 1, "task.eval_prompts must be >= 1"),
        (cfg.eval_max_new_tokens >= 1, "task.eval_max_new_tokens must be >= 1"),
        (cfg.temperature >= 0, "task.temperature must be >= 0 (0 = greedy)"),
        (cfg.template in ("chat", "raw"), f"task.template={cfg.template!r}: use chat or raw"),
        (cfg.reward in ("es_paper", "tinyzero"), f"task.reward={cfg.reward!r}: use es_paper or tinyzero"),
        (name != "conciseness" or not cfg.data_path,
         f"task.data_path={cfg.data_path!r}: the conciseness task ships its own questions"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
