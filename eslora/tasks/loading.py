"""Objects named in a config: `pkg.module:Name` or `path/to/file.py:Name` (a task, a reward).

Used for `task.name` (a user's task class or factory) and the `prompts` task's reward
functions, as TRL takes `--reward_funcs my_lib.rewards.fn`. The code named is the user's own,
imported because the config names it; nothing else is ever run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from eslora.tasks.base import Task, TaskError


def is_object_path(spec: str) -> bool:
    """A `module:Name` or `file.py:Name` reference (built-in names have no colon)."""
    module, sep, attr = spec.rpartition(":")
    return bool(sep and module and attr)


def is_file_path(spec: str) -> bool:
    return is_object_path(spec) and spec.rpartition(":")[0].endswith(".py")


def absolute(spec: str) -> str:
    """A `file.py:Name` made absolute against this process's working directory (Ray actors
    and nodes may run elsewhere); module paths unchanged."""
    if not is_file_path(spec):
        return spec
    path, _, attr = spec.rpartition(":")
    return f"{Path(path).expanduser().resolve()}:{attr}"


def _module_from_file(path: Path, key: str) -> Any:
    if not path.is_file():
        raise TaskError(f"{key}: no such file {str(path)!r}")
    # One module per file (its hash in the name): a file imported twice is the same module.
    name = "eslora_user_" + path.stem.replace("-", "_") + "_" + hashlib.sha1(str(path).encode()).hexdigest()[:8]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"{key}: cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's module failed: say where
        del sys.modules[name]
        raise TaskError(f"{key}: importing {str(path)!r} failed: {type(err).__name__}: {err}") from err
    return module


def _import_module(module: str, key: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        cwd = os.getcwd()
        # As `python -m` would: a package in the working directory, when `eslora` (a console
        # script) did not put the working directory on sys.path. Appended: never shadows.
        local = (Path(cwd) / top).is_dir() or (Path(cwd) / f"{top}.py").is_file()
        if err.name == top and local and cwd not in sys.path:
            sys.path.append(cwd)
            return _import_module(module, key)
        raise TaskError(f"{key}: cannot import module {module!r}: {err}") from err
    except Exception as err:  # noqa: BLE001
        raise TaskError(f"{key}: importing {module!r} failed: {type(err).__name__}: {err}") from err


def resolve(spec: str, key: str) -> Any:
    """The object `spec` names; TaskError naming `key` (e.g. task.name) when it cannot be found."""
    if not is_object_path(spec):
        raise TaskError(f"{key}={spec!r}: expected 'package.module:Name' or 'path/to/file.py:Name'")
    where, _, attr = spec.rpartition(":")
    module = _module_from_file(Path(where).expanduser(), f"{key}={spec!r}") if where.endswith(".py") \
        else _import_module(where, f"{key}={spec!r}")
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"{key}={spec!r}: {where!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_task(target: Any, cfg: Any, tokenizer: Any, key: str = "task.name") -> Task:
    """A task from a class or factory: `from_config(cfg, tokenizer)` if it has one, else called
    with task.kwargs, plus `tokenizer=` / `data_seed=` / `template=` where its signature takes them."""
    kwargs: dict[str, Any] = dict(getattr(cfg, "kwargs", None) or {})
    if hasattr(target, "from_config"):
        task = target.from_config(cfg, tokenizer)
    elif callable(target):
        extra = {"tokenizer": tokenizer, "data_seed": cfg.data_seed, "template": cfg.template}
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            params = {}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for name, value in extra.items():
            if name not in kwargs and (name in params or takes_any):
                kwargs[name] = value
        try:
            task = target(**kwargs)
        except TypeError as err:
            raise TaskError(f"{key}={cfg.name!r}: cannot build it with task.kwargs={_show(kwargs)}: {err}") from err
    else:
        raise TaskError(f"{key}={cfg.name!r} names a {type(target).__name__}, not a task class or factory")
    if not isinstance(task, Task):
        missing = [m for m in ("name", "train_problems", "eval_problems", "score") if not hasattr(task, m)]
        raise TaskError(f"{key}={cfg.name!r} built a {type(task).__name__} without {', '.join(missing)} "
                        "(a task needs name, train_problems, eval_problems and score; see docs/custom_tasks.md)")
    return task


def _show(kwargs: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={'<tokenizer>' if k == 'tokenizer' else repr(v)}" for k, v in kwargs.items()) + "}"
