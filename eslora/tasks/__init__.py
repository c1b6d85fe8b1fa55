"""Tasks: datasets, prompts and rewards (nothing of ES or serving).

`make_task(cfg.task, tokenizer)` builds the task a config names: a built-in one, "countdown"
(the ES paper's and TinyZero's Countdown, `eslora.tasks.countdown`), "conciseness" (the ES
paper's length task) or "prompts" (prompts from a Hugging Face `datasets` source scored by
TRL-style reward functions), or the user's own, `package.module:Name` or `path/to/file.py:Name`
(a task class or factory, arguments under `task.kwargs`). See docs/tasks.md and
docs/custom_tasks.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eslora.tasks import loading
from eslora.tasks.base import DatasetError, Problem, Task, TaskError, accuracy
from eslora.tasks.conciseness import ConcisenessTask
from eslora.tasks.countdown import REWARDS, CountdownTask
from eslora.tasks.prompts import PromptTask
from eslora.tasks.splits import check_rows

__all__ = ["Problem", "Task", "accuracy", "make_task", "CountdownTask", "ConcisenessTask", "PromptTask",
           "DatasetError", "TaskError", "TASKS", "validate_config"]

BUILTIN: dict[str, Any] = {"countdown": CountdownTask, "conciseness": ConcisenessTask, "prompts": PromptTask}
TASKS = tuple(BUILTIN)
FILE_KEYS = ("data_path", "eval_data_path", "train_rows", "eval_rows")  # keys of tasks that read rows


def _unknown(name: str) -> str:
    return (f"task.name={name!r}: unknown task; use one of {', '.join(TASKS)}, or your own as "
            "'package.module:Name' or 'path/to/file.py:Name' (docs/custom_tasks.md)")


def task_class(name: str) -> Any:
    """The class or factory `task.name` names (imports a user's module or file)."""
    builtin = BUILTIN.get(str(name).strip().lower())
    if builtin is not None:
        return builtin
    if not loading.is_object_path(str(name)):
        raise TaskError(_unknown(name))
    return loading.resolve(str(name), "task.name")


def _check_no_files(target: Any, cfg: Any) -> None:
    if target is ConcisenessTask:
        for key in FILE_KEYS:
            if getattr(cfg, key):
                raise ValueError(f"task.{key}={getattr(cfg, key)!r}: the conciseness task ships its own questions")


def make_task(cfg: Any, tokenizer: Any = None) -> Task:
    """The task of a `TaskConfig`.

    `tokenizer`: a HF tokenizer; its chat template renders prompts when cfg.template == "chat".
    With None, or a tokenizer without a chat template, prompts use the plain
    "<system>\\nUser: ...\\nAssistant: ..." layout (see eslora.tasks.base.plain_chat).
    """
    target = task_class(cfg.name)
    _check_no_files(target, cfg)
    if target in BUILTIN.values():
        return target.from_config(cfg, tokenizer)
    return loading.build_task(target, cfg, tokenizer)


def validate_config(cfg: Any) -> None:
    """The `task` section's value rules (raises ValueError naming the key); `load_config` calls it.

    The rules every task shares are here; each task class adds its own through a classmethod
    `validate_config(cls, cfg)` (a user's task may define one too). A user's task is imported
    and built once here (tokenizer None), so a bad path fails at load. Relative file paths
    (task.name's file, data files) are made absolute against this working directory, because
    the actors rebuild the task from the config in other processes, possibly on other nodes.
    """
    name = str(cfg.name).strip()
    checks = [
        (bool(name), _unknown(name)),
        (cfg.num_prompts >= 1, "task.num_prompts must be >= 1"),
        (cfg.max_new_tokens >= 1, "task.max_new_tokens must be >= 1"),
        (cfg.eval_prompts >= 1, "task.eval_prompts must be >= 1"),
        (cfg.eval_max_new_tokens >= 1, "task.eval_max_new_tokens must be >= 1"),
        (cfg.temperature >= 0, "task.temperature must be >= 0 (0 = greedy)"),
        (cfg.template in ("chat", "raw"), f"task.template={cfg.template!r}: use chat or raw"),
        (cfg.reward in REWARDS, f"task.reward={cfg.reward!r}: use {' or '.join(REWARDS)}"),
        (cfg.train_set_size >= 0, f"task.train_set_size={cfg.train_set_size} must be >= 0 (0 = fresh problems "
                                  "every generation)"),
        (not cfg.train_set_size or cfg.num_prompts <= cfg.train_set_size,
         f"task.num_prompts={cfg.num_prompts} is more than task.train_set_size={cfg.train_set_size}: a generation "
         "scores the whole fixed set at most"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_rows(cfg.train_rows, "task.train_rows")
    check_rows(cfg.eval_rows, "task.eval_rows")
    target = task_class(name)  # imports a user's module: a bad path fails here, naming task.name
    _check_no_files(target, cfg)
    for key in ("data_path", "eval_data_path"):
        if getattr(cfg, key):
            setattr(cfg, key, str(Path(getattr(cfg, key)).expanduser().resolve()))
    if target in (CountdownTask, ConcisenessTask) and cfg.kwargs:
        raise ValueError(f"task.kwargs={dict(cfg.kwargs)}: the {name} task takes its options as task.* keys "
                         "(task.kwargs is for task.name=prompts and your own tasks)")
    if hasattr(target, "validate_config"):
        target.validate_config(cfg)
    if target not in BUILTIN.values():
        cfg.name = loading.absolute(name)
        try:
            loading.build_task(target, cfg, None)
        except TaskError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's constructor failed: say which task
            raise TaskError(f"task.name={name!r}: building it failed: {type(err).__name__}: {err}") from err
