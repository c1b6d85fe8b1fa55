"""Bring your own task (issue 17): task.name as an import or file path with task.kwargs, checked at
load; the generic `prompts` task on Hugging Face `datasets` with TRL-style reward functions."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from eslora.config import ConfigError, load_config
from eslora.tasks import DatasetError, PromptTask, Task, TaskError, make_task

ROOT = Path(__file__).resolve().parent.parent

USER_TASK = '''
from eslora.tasks import Problem

class EchoTask:
    name = "echo"

    def __init__(self, word="hi", repeat=1, tokenizer=None, data_seed=0):
        self.word, self.repeat, self.data_seed = word, repeat, data_seed

    @classmethod
    def validate_config(cls, cfg):
        if "word" in cfg.kwargs and not str(cfg.kwargs["word"]).isalpha():
            raise ValueError(f"task.kwargs.word={cfg.kwargs['word']!r}: letters only")

    def train_problems(self, generation, n):
        return [Problem(prompt=f"say {self.word} ({self.data_seed}, {generation}, {i})", id=str(i)) for i in range(n)]

    def eval_problems(self, n):
        return [Problem(prompt=f"say {self.word}", id="e")][:n]

    def score(self, problem, completion):
        hit = float(completion.count(self.word) >= self.repeat)
        return {"reward": hit, "answer": hit}

def make_echo(word="yo"):
    return EchoTask(word=word)

class NotATask:
    def __init__(self):
        pass

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_tasks.py"
    path.write_text(USER_TASK)
    return path


def task_config(*overrides: str):
    return load_config(None, list(overrides)).task


def test_task_from_a_file_with_kwargs(user_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = task_config("task.name=user_tasks.py:EchoTask", "task.kwargs.word=ok", "task.kwargs.repeat=2",
                      "task.data_seed=7")
    assert cfg.name == f"{user_file}:EchoTask"  # absolute: the actors rebuild it from the config elsewhere
    monkeypatch.chdir(ROOT)
    task = make_task(cfg)
    assert isinstance(task, Task) and task.name == "echo"
    assert task.train_problems(3, 2)[1].prompt == "say ok (7, 3, 1)"  # kwargs and data_seed reached it
    assert task.score(task.eval_problems(1)[0], "ok ok") == {"reward": 1.0, "answer": 1.0}
    assert task.score(task.eval_problems(1)[0], "ok") == {"reward": 0.0, "answer": 0.0}
    factory = make_task(task_config(f"task.name={user_file}:make_echo"))
    assert factory.word == "yo"


def test_task_from_a_module_path(user_file: Path, monkeypatch) -> None:
    package = user_file.parent / "mytasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "echo.py").write_text(USER_TASK)
    monkeypatch.chdir(user_file.parent)  # a package in the working directory, not installed
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(user_file.parent))])
    cfg = task_config("task.name=mytasks.echo:EchoTask", "task.kwargs.word=abc")
    assert cfg.name == "mytasks.echo:EchoTask"
    assert make_task(cfg).eval_problems(1)[0].prompt == "say abc"
    monkeypatch.delitem(sys.modules, "mytasks.echo")
    monkeypatch.delitem(sys.modules, "mytasks")


@pytest.mark.parametrize("name, needle", [
    ("nope", "unknown task"),
    ("no_such_file.py:EchoTask", "no such file"),
    ("{file}:Missing", "has no 'Missing'"),
    ("{file}:NotATask", "without name, train_problems, eval_problems, score"),
    ("{file}:NOT_CALLABLE", "not a task class or factory"),
    ("no_such_module_xyz.tasks:EchoTask", "cannot import module 'no_such_module_xyz.tasks'"),
    ("{file}", "unknown task"),  # a file without :Name
])
def test_bad_task_name_fails_at_load_naming_the_key(user_file: Path, name: str, needle: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"task.name={name.format(file=user_file)}"])
    assert "task.name" in str(err.value) and needle in str(err.value)
    assert time.perf_counter() - started < 5


def test_bad_user_kwargs_fail_at_load(user_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.kwargs\.word='a1': letters only"):  # the task's own rule
        load_config(None, [f"task.name={user_file}:EchoTask", "task.kwargs.word=a1"])
    with pytest.raises(ConfigError, match=r"task\.name=.*cannot build it with task\.kwargs=\{colour='red'"):
        load_config(None, [f"task.name={user_file}:EchoTask", "task.kwargs.colour=red"])
    failing = user_file.parent / "failing.py"
    failing.write_text("class T:\n    def __init__(self):\n        raise OSError('no data here')\n")
    with pytest.raises(ConfigError, match=r"task\.name=.*failing\.py:T.*building it failed: OSError: no data here"):
        load_config(None, [f"task.name={failing}:T"])
    broken = user_file.parent / "broken.py"
    broken.write_text("raise RuntimeError('half written')\n")
    with pytest.raises(ConfigError, match=r"task\.name=.*broken\.py.*RuntimeError: half written"):
        load_config(None, [f"task.name={broken}:Task"])
    assert issubclass(TaskError, ValueError)


# ---------------------------------------------------------------------------------------------
# The generic prompts task

REWARDS = '''
CALLS = []

def has_answer(prompts, completions, answer, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions, "answer": answer, **kwargs})
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

def length(completions, **kwargs):
    return [float(len(c)) for c in completions]

def not_applicable(completions, **kwargs):
    return [None for _ in completions]

def wrong_count(completions, **kwargs):
    return [1.0, 2.0]

def not_a_number(completions, **kwargs):
    return ["high" for _ in completions]
'''


@pytest.fixture
def prompt_files(tmp_path: Path) -> tuple[Path, Path]:
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "level": i % 3} for i in range(30)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARDS)
    return data, rewards


def prompts_config(data: Path, rewards: Path, *extra: str):
    return task_config("task.name=prompts", f"task.kwargs.dataset={data}", "task.kwargs.prompt_column=question",
                       f"task.kwargs.rewards=[{rewards}:has_answer,{rewards}:length]", *extra)


def test_prompts_task_scores_like_trl(prompt_files) -> None:
    data, rewards = prompt_files
    cfg = prompts_config(data, rewards, "task.kwargs.reward_weights=[2.0,0.5]", 'task.eval_rows="-5:"',
                         "task.template=raw")
    task = make_task(cfg)
    assert isinstance(task, PromptTask)
    held_out = task.eval_problems(100)
    assert [p.id for p in held_out] == [f"qa.jsonl:{i}" for i in range(25, 30)]
    train = task.train_problems(0, 25)
    assert {p.id for p in train} == {f"qa.jsonl:{i}" for i in range(25)}
    p = held_out[0]
    assert p.prompt == "What is 25 + 25?" and p.data["answer"] == "50"
    scores = task.score(p, "It is 50")
    assert scores == {"reward": 2.0 * 1.0 + 0.5 * 8, "answer": 1.0, "has_answer": 1.0, "length": 8.0}
    module = sys.modules[[m for m in sys.modules if m.startswith("eslora_user_my_rewards")][0]]
    assert module.CALLS[-1] == {"prompts": ["What is 25 + 25?"], "completions": ["It is 50"], "answer": ["50"],
                                "level": [1]}  # the other columns, as lists, as TRL passes them
    # Same seed -> the same problems per generation; another generation draws others.
    again = make_task(cfg)
    assert [q.id for q in again.train_problems(3, 6)] == [q.id for q in task.train_problems(3, 6)]
    assert [q.id for q in task.train_problems(3, 6)] != [q.id for q in task.train_problems(4, 6)]


def test_prompts_task_options(prompt_files) -> None:
    data, rewards = prompt_files
    chat = make_task(prompts_config(data, rewards, "task.kwargs.system_prompt=Be brief."))
    assert chat.train_problems(0, 1)[0].prompt.startswith("Be brief.\nUser: What is")  # no chat template: plain
    fixed = make_task(prompts_config(data, rewards, "task.train_set_size=4", "task.num_prompts=4"))
    assert all(fixed.train_problems(g, 4) == fixed.train_problems(0, 4) for g in range(5))
    none = make_task(task_config("task.name=prompts", f"task.kwargs.dataset={data}", "task.kwargs.prompt_column=question",
                                 f"task.kwargs.rewards=[{rewards}:not_applicable,{rewards}:has_answer]",
                                 f"task.kwargs.answer_reward={rewards}:has_answer"))
    p = none.eval_problems(1)[0]
    assert none.score(p, p.data["answer"]) == {"reward": 1.0, "answer": 1.0, "not_applicable": 0.0, "has_answer": 1.0}
    csv = data.with_suffix(".csv")
    csv.write_text("question,answer\nWhat is 1?,1\nWhat is 2?,2\nWhat is 3?,3\n")
    from_csv = make_task(prompts_config(csv, rewards, 'task.eval_rows="2:3"'))  # unquoted, YAML reads 123
    assert [q.data["answer"] for q in from_csv.eval_problems(5)] == [3]  # csv reads numbers as numbers
    bad = make_task(task_config("task.name=prompts", f"task.kwargs.dataset={data}", "task.kwargs.prompt_column=question",
                                f"task.kwargs.rewards=[{rewards}:wrong_count]"))
    with pytest.raises(TaskError, match="'wrong_count' returned"):
        bad.score(bad.eval_problems(1)[0], "x")
    words = make_task(task_config("task.name=prompts", f"task.kwargs.dataset={data}",
                                  "task.kwargs.prompt_column=question", f"task.kwargs.rewards=[{rewards}:not_a_number]"))
    with pytest.raises(TaskError, match=r"'not_a_number' returned \['high'\]; expected a list with one float"):
        words.score(words.eval_problems(1)[0], "x")


def test_prompts_task_on_a_dataset_folder_with_splits(prompt_files, tmp_path: Path) -> None:
    """A folder with train/test files goes through load_dataset(id, split=...) as a hub id does."""
    data, rewards = prompt_files
    folder = tmp_path / "qa_dataset"
    folder.mkdir()
    lines = data.read_text().splitlines(keepends=True)
    (folder / "train.jsonl").write_text("".join(lines[:20]))
    (folder / "test.jsonl").write_text("".join(lines[20:]))
    task = make_task(task_config("task.name=prompts", f"task.kwargs.dataset={folder}", "task.kwargs.split=train",
                                 "task.kwargs.eval_split=test", "task.kwargs.prompt_column=question",
                                 f"task.kwargs.rewards=[{rewards}:has_answer]"))
    assert [p.data["answer"] for p in task.eval_problems(100)] == [str(2 * i) for i in range(20, 30)]
    assert {p.data["answer"] for p in task.train_problems(0, 20)} == {str(2 * i) for i in range(20)}


@pytest.mark.parametrize("extra, needle", [
    (["task.kwargs.colour=red"], "task.kwargs.colour"),
    (["task.kwargs.dataset="], "task.kwargs.dataset"),
    (["task.kwargs.dataset=missing.jsonl"], "no such file"),
    (["task.kwargs.rewards=[]"], "task.kwargs.rewards"),
    (["task.kwargs.rewards=[{rewards}:nope]"], "task.kwargs.rewards[0]"),
    (["task.kwargs.reward_weights=[1.0]"], "task.kwargs.reward_weights"),
    (["task.kwargs.answer_reward=x.py:f"], "task.kwargs.answer_reward"),
    (["task.kwargs.split=test"], "task.kwargs.split"),
    (["task.kwargs.eval_split=train"], "task.kwargs.eval_split"),
])
def test_prompts_task_bad_kwargs_fail_at_load(prompt_files, extra, needle) -> None:
    data, rewards = prompt_files
    with pytest.raises(ConfigError) as err:
        prompts_config(data, rewards, *[e.format(rewards=rewards) for e in extra])
    assert needle in str(err.value)


def test_prompts_task_missing_column(prompt_files) -> None:
    data, rewards = prompt_files
    with pytest.raises(DatasetError, match=r"no column 'prompt' \(task\.kwargs\.prompt_column\); columns: question"):
        make_task(task_config("task.name=prompts", f"task.kwargs.dataset={data}",
                              f"task.kwargs.rewards=[{rewards}:length]"))


def test_shipped_examples_load_with_absolute_paths() -> None:
    mine = load_config(ROOT / "examples" / "my_task.yaml").task
    assert mine.name == f"{ROOT / 'examples' / 'my_task.py'}:ShoutTask"
    prompts = load_config(ROOT / "examples" / "prompts.yaml").task
    assert prompts.kwargs["dataset"] == str(ROOT / "examples" / "prompts.jsonl")
    assert prompts.kwargs["rewards"][0] == f"{ROOT / 'examples' / 'rewards.py'}:mentions_answer"
