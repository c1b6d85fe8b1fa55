"""Countdown: published reward rules, adversarial fuzz, prompts, generator, loaders, task API."""

from __future__ import annotations

import builtins
import contextlib
import json
import random
import re
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eslora.config import TaskConfig
from eslora.tasks import Problem, Task, accuracy, make_task
from eslora.tasks.countdown import (
    ASSISTANT_PREFIX,
    CountdownTask,
    DatasetError,
    chat_prompt,
    es_paper_reward,
    format_after_think,
    format_reward,
    generate_problem,
    is_eval_problem,
    last_answer,
    load_countdown_file,
    raw_prompt,
    reachable,
    scan,
    solve,
    tinyzero_reward,
)
from eslora.tasks.expr import check_expression
from chatml import CHATML, chatml_tokenizer

NUMS, TARGET = [44, 19, 35], 98


# ---------------------------------------------------------------------------------------------
# The published regexes (ES paper countdown_task.py), used as the reference on short strings.

def ref_format(response: str) -> float:
    if re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", response, re.DOTALL):
        return 1.0
    r = 0.0
    if re.search(r"<think>.*?<\/think>", response, re.DOTALL):
        r += 0.1
    if re.search(r"<answer>.*?<\/answer>", response, re.DOTALL):
        r += 0.5
    return r


def ref_last_answer(text: str):
    m = re.findall(r"<answer>(.*?)<\/answer>", text, re.DOTALL)
    return m[-1] if m else None


FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "\n", "</think>\n<answer>", "<", ">", "/",
             "answer", "think", "1", "+", " ", "x", "<answer", "/answer>", "\n\n"]
frag_text = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)


@settings(max_examples=2500, deadline=None)
@given(frag_text)
def test_tag_scans_equal_published_regexes(text: str) -> None:
    assert last_answer(text) == ref_last_answer(text)
    assert format_reward(text) == ref_format(text)
    assert format_after_think(text) == ref_format("<think>" + text)
    ref = ref_last_answer(text)
    for max_span in (10_000, 3):  # the rewards' scan, also with a tiny span bound
        fmt, present, span = scan(text, max_span=max_span)
        assert fmt == ref_format("<think>" + text)
        assert present == (ref is not None)
        if ref is not None and len(ref) <= max_span:
            assert span is not None and text[span[0]:span[1]] == ref
        else:
            assert span is None


# ---------------------------------------------------------------------------------------------
# Table tests: the ES paper rule (0.1 * format + answer) and TinyZero (0 / 0.1 / 1).

CASES = [
    # (completion, format, answer, tinyzero)
    ("I add them.</think>\n<answer>(44 + 19) + 35</answer>", 1.0, 1.0, 1.0),  # correct, full format
    ("I add them.</think>\n<answer>(44 + 19) + 35</answer>\n", 1.0, 1.0, 1.0),  # $ before final \n
    ("I add them.</think>\n<answer>44+19+35</answer><|endoftext|>", 0.6, 1.0, 1.0),  # trailing text
    ("ok</think> <answer>44 + 19 + 35</answer>", 0.6, 1.0, 1.0),  # space, not newline, after </think>
    ("ok</think>\n<answer>\n  44 + 19\n + 35 \n</answer>", 1.0, 1.0, 1.0),  # whitespace and newlines
    ("ok</think>\n<answer>44 + 19 + 36</answer>", 1.0, 0.0, 0.1),  # wrong number
    ("ok</think>\n<answer>44 + 44 + 10</answer>", 1.0, 0.0, 0.1),  # reused number
    ("ok</think>\n<answer>44 + 19</answer>", 1.0, 0.0, 0.1),  # missing number
    ("ok</think>\n<answer>44 + 19 - 35</answer>", 1.0, 0.0, 0.1),  # right numbers, wrong value
    ("ok</think>\n<answer>44 + 19 + 35 = 98</answer>", 1.0, 0.0, 0.1),  # '=' is not allowed
    ("ok</think>\n<answer></answer>", 1.0, 0.0, 0.1),  # empty answer
    ("(44 + 19) + 35", 0.0, 0.0, 0.0),  # no tags at all
    ("ok</think> the answer is 44 + 19 + 35", 0.1, 0.0, 0.0),  # think only
    ("<answer>44 + 19 + 35</answer>", 0.5, 1.0, 1.0),  # answer only
    ("<answer>44 + 19 + 35", 0.0, 0.0, 0.0),  # unclosed answer
    # several answers: the last one counts
    ("ok</think>\n<answer>1 + 2</answer> wait <answer>44 + 19 + 35</answer>", 1.0, 1.0, 1.0),
    ("ok</think>\n<answer>44 + 19 + 35</answer> wait <answer>1 + 2</answer>", 1.0, 0.0, 0.1),
    # deliberate differences from eval: ** and // are not Countdown operations
    ("ok</think>\n<answer>2**3 + 44 + 19 + 35 - 8</answer>", 1.0, 0.0, 0.1),
    ("ok</think>\n<answer>(44 + 19 + 35) // 1</answer>", 1.0, 0.0, 0.1),
    ("ok</think>\n<answer>99**80**50**2</answer>", 1.0, 0.0, 0.1),
    ("ok</think>\n<answer>44 + 19 + 35 + 0 / 0</answer>", 1.0, 0.0, 0.1),  # division by zero
    ("ok</think>\n<answer>044 + 19 + 35</answer>", 1.0, 0.0, 0.1),  # leading zero: SyntaxError in eval
    ("ok</think>\n<answer>٤٤ + 19 + 35</answer>", 1.0, 0.0, 0.1),  # unicode digits
    ("ok</think>\n<answer>__import__('os').system('true')</answer>", 1.0, 0.0, 0.1),
]


@pytest.mark.parametrize("completion, fmt, ans, tz", CASES)
def test_reward_table(completion: str, fmt: float, ans: float, tz: float) -> None:
    parts = es_paper_reward(completion, NUMS, TARGET)
    assert parts["format"] == fmt
    assert parts["format"] == ref_format("<think>" + completion)
    assert parts["answer"] == ans
    assert parts["reward"] == pytest.approx(0.1 * fmt + ans)
    assert tinyzero_reward(completion, NUMS, TARGET) == tz


def test_reward_inputs_as_in_the_data() -> None:
    good = "x</think>\n<answer>((83 - (78 / 39)) + 1)</answer>"
    assert es_paper_reward(good, [83, 78, 1, 39], "82")["answer"] == 1.0  # ES JSON: target is a str
    assert es_paper_reward("<answer>137 / 5</answer>", [137, 5], "27.4")["answer"] == 1.0
    assert es_paper_reward("<answer>1/3</answer>", (1, 3), Fraction(1, 3))["answer"] == 1.0
    with pytest.raises(TypeError):
        es_paper_reward(None, NUMS, TARGET)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Adversarial fuzz: no exception, nothing executed, bounded time.

EVIL = [
    "99**80**50**2", "9**9**9**9", "(" * 500, ")" * 500, "(" * 100 + "1" + ")" * 100, "-" * 300 + "1",
    "__import__('os').system('touch {sentinel}')", "open('{sentinel}', 'w').write('x')",
    "lambda: open('{sentinel}','w')", "().__class__.__bases__[0].__subclasses__()", "exec('1')",
    "eval('1')", "\x00", "\x00" * 50, "٣", "１２", "𝟗", "1e308", "0x1F", "1_000", "9" * 5000,
    "<answer>", "</answer>", "<think>", "</think>", "</think>\n<answer>", "<answer><answer>",
    "\n", " ", "+", "*", "/", "//", "**", "44", "19", "35", "98", "\ud800".encode("utf-8", "surrogatepass").decode(
        "utf-8", "replace"), "\u202e", "\r\n", "\t",
]


def _evil(sentinel: Path) -> st.SearchStrategy:
    pieces = st.sampled_from([e.replace("{sentinel}", str(sentinel)) for e in EVIL]) | st.text(max_size=8)
    return st.lists(pieces, max_size=20).map("".join)


@pytest.fixture
def no_exec(tmp_path):
    """A sentinel path that evil completions try to create."""
    return tmp_path / "pwned"


def _boom(*args, **kwargs):
    raise AssertionError("code execution attempted")


@contextlib.contextmanager
def _exec_forbidden():
    """Spy: eval/exec called while scoring fails the test loudly (hypothesis itself uses exec,
    so the spy is only armed around the scoring calls)."""
    saved = builtins.eval, builtins.exec
    builtins.eval, builtins.exec = _boom, _boom
    try:
        yield
    finally:
        builtins.eval, builtins.exec = saved


def _score_all(text: str) -> None:
    with _exec_forbidden():
        es = es_paper_reward(text, NUMS, TARGET)
        tz = tinyzero_reward(text, NUMS, TARGET)
    assert set(es) == {"reward", "format", "answer"}
    assert es["format"] in (0.0, 0.1, 0.5, 0.6, 1.0) and es["answer"] in (0.0, 1.0)
    assert tz in (0.0, 0.1, 1.0)


WRAPPERS = ["{}", "<answer>{}</answer>", "x</think>\n<answer>{}</answer>", "<answer>{}", "{}</answer>"]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_adversarial_completions(no_exec, data) -> None:
    """2,000 draws x 5 wrappings = 10,000 adversarial completions (plus 6,000 below)."""
    text = data.draw(_evil(no_exec))
    for wrapper in WRAPPERS:
        _score_all(wrapper.format(text))
    assert not no_exec.exists()


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_fuzz_any_text_in_answer(no_exec, text: str) -> None:
    _score_all(f"ok</think>\n<answer>{text}</answer>")
    _score_all(text)


def test_huge_adversarial_strings_are_fast(no_exec) -> None:
    """10 MB strings of each worst case. The bound here is deliberately loose (loaded CI);
    bench/bench_rewards.py measures the real figures (10 MB well under 100 ms)."""
    mb10 = 10 * 1024 * 1024
    cases = {
        "open tags": "<answer>" * (mb10 // 8),
        "joints": ("</think>\n<answer></answer>x" * (mb10 // 27)),
        "answers": "<answer>1</answer>" * (mb10 // 18),
        "parens": "<answer>" + "(" * mb10 + "</answer>",
        "powers": "<answer>" + "9**" * (mb10 // 3) + "9</answer>",
        "nul": "\x00" * mb10,
        "unicode": "٣" * (mb10 // 2),
    }
    for name, text in cases.items():
        t0 = time.perf_counter()
        _score_all(text)
        elapsed = time.perf_counter() - t0
        assert elapsed < 2.0, f"{name}: {elapsed:.3f}s"
    assert not no_exec.exists()


def test_100kb_completion_is_fast() -> None:
    rng = random.Random(0)
    text = "".join(rng.choice(FRAGMENTS + ["44", "(", ")", "**"]) for _ in range(30_000))[:100_000]
    t0 = time.perf_counter()
    for _ in range(10):
        _score_all(text)
    assert (time.perf_counter() - t0) / 10 < 0.2  # bench: well under 10 ms


# ---------------------------------------------------------------------------------------------
# Prompts

# Two rows verbatim from the ES paper's countdown.json (`context` fields).
PAPER_ROWS = [
    {
        "id": 0,
        "context": "You are a helpful assistant. You first think about the reasoning process in your mind and then "
        "provide the user with the answer.Using the numbers [44 19 35], create an equation that equals 98. "
        "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. Show "
        "your work in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
        "example <answer> (1 + 2) / 3 </answer>.Let me solve this step by step.\n<think>",
        "numbers": [44, 19, 35], "target": "98", "solution": "((44 + 19) + 35)",
    },
    {
        "id": 15,
        "context": "You are a helpful assistant. You first think about the reasoning process in your mind and then "
        "provide the user with the answer.Using the numbers [74  5 20 88], create an equation that equals 50. "
        "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. Show "
        "your work in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
        "example <answer> (1 + 2) / 3 </answer>.Let me solve this step by step.\n<think>",
        "numbers": [74, 5, 20, 88], "target": "50", "solution": "((5 * (88 - 74)) - 20)",
    },
]


def test_raw_prompt_is_the_es_paper_context() -> None:
    for row in PAPER_ROWS:
        assert raw_prompt(row["numbers"], row["target"]) == row["context"]
        assert check_expression(row["solution"], row["numbers"], Fraction(row["target"]))


def test_chat_prompt_with_a_real_chat_template() -> None:
    prompt = chat_prompt([1, 2, 3], 6, chatml_tokenizer(CHATML))
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert "<|im_start|>user\nUsing the numbers [1 2 3], create an equation that equals 6." in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\nLet me solve this step by step.\n<think>")


def test_chat_prompt_template_that_cannot_continue() -> None:
    strict = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ raise_exception('no') }}"
              "{% endif %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
    prompt = chat_prompt([1, 2, 3], 6, chatml_tokenizer(strict))
    assert prompt.endswith("\nassistant: " + ASSISTANT_PREFIX)


def test_chat_prompt_fallback_without_template() -> None:
    for tok in (None, chatml_tokenizer(None)):
        prompt = chat_prompt([1, 2, 3], 6, tok)
        assert prompt.startswith("You are a helpful assistant.")
        assert "\nUser: Using the numbers [1 2 3]" in prompt
        assert prompt.endswith("\nAssistant: Let me solve this step by step.\n<think>")


# ---------------------------------------------------------------------------------------------
# Generator: every problem solvable (independent exhaustive solver), in range, deterministic.

def brute_force_solvable(numbers: list[int], target: int) -> bool:
    """Independent solver: all ways to merge two values, with exact Fractions."""
    def rec(vals: tuple) -> bool:
        if len(vals) == 1:
            return vals[0] == target
        for i in range(len(vals)):
            for j in range(len(vals)):
                if i == j:
                    continue
                a, b = vals[i], vals[j]
                rest = tuple(v for k, v in enumerate(vals) if k not in (i, j))
                outs = [a + b, a - b, a * b] + ([a / b] if b != 0 else [])
                if any(rec(rest + (o,)) for o in outs):
                    return True
        return False

    return rec(tuple(Fraction(n) for n in numbers))


def test_generated_problems_are_solvable() -> None:
    task = CountdownTask(template="raw", data_seed=7)
    problems = task.train_problems(0, 40) + task.train_problems(1, 40) + task.eval_problems(40)
    for p in problems:
        nums, target = p.data["numbers"], p.data["target"]
        assert 3 <= len(nums) <= 4 and all(1 <= n <= 99 for n in nums)
        assert isinstance(target, int) and 10 <= target <= 100
        assert check_expression(p.data["solution"], nums, Fraction(target)), p
        assert brute_force_solvable(nums, target), p
        assert p.prompt == raw_prompt(nums, target) and p.prompt.endswith("<think>")


def test_generator_settings_and_solver() -> None:
    rng = random.Random(3)
    for _ in range(30):
        nums, target, sol = generate_problem(rng, (2, 2), (1, 9), (1, 20))
        assert len(nums) == 2 and 1 <= target <= 20
        assert brute_force_solvable(nums, target) and check_expression(sol, nums, Fraction(target))
    assert solve([44, 19, 35], 98) is not None
    assert solve([1, 1, 1], 50) is None and not brute_force_solvable([1, 1, 1], 50)
    # reachable() agrees with the independent solver on every target of a small instance.
    reach = reachable([3, 7, 8])
    for t in range(-30, 200):
        assert (Fraction(t) in reach) == brute_force_solvable([3, 7, 8], t)


def test_train_problems_deterministic_and_shared() -> None:
    cfg = TaskConfig(name="countdown", template="raw", data_seed=11)
    a, b = make_task(cfg), make_task(cfg)  # e.g. the driver and an actor, each from the config
    assert [p.data for p in a.train_problems(3, 8)] == [p.data for p in b.train_problems(3, 8)]
    assert [p.prompt for p in a.train_problems(3, 8)] == [p.prompt for p in b.train_problems(3, 8)]
    assert a.train_problems(3, 8)[:5] == a.train_problems(3, 5)  # prefix-stable
    assert [p.data for p in a.train_problems(3, 8)] != [p.data for p in a.train_problems(4, 8)]
    other = make_task(TaskConfig(name="countdown", template="raw", data_seed=12))
    assert [p.data for p in a.train_problems(3, 8)] != [p.data for p in other.train_problems(3, 8)]
    # The held-out set does not depend on data_seed and is prefix-stable.
    assert [p.data for p in a.eval_problems(10)] == [p.data for p in other.eval_problems(10)]
    assert a.eval_problems(5) == a.eval_problems(10)[:5]


def _key(p: Problem) -> tuple:
    return tuple(sorted(p.data["numbers"])), Fraction(p.data["target"])


def test_eval_never_overlaps_train() -> None:
    task = CountdownTask(template="raw", data_seed=5)
    eval_keys = {_key(p) for p in task.eval_problems(64)}
    assert len(eval_keys) == 64  # no duplicates inside the held-out set
    for g in range(25):
        for p in task.train_problems(g, 16):
            assert _key(p) not in eval_keys
            assert not is_eval_problem(p.data["numbers"], p.data["target"], 0.1)


def test_score_and_accuracy() -> None:
    task = make_task(TaskConfig(name="countdown", reward="es_paper"))
    assert isinstance(task, Task) and task.name == "countdown"
    p = task.train_problems(0, 1)[0]
    good = f"x</think>\n<answer>{p.data['solution']}</answer>"
    s_good, s_bad = task.score(p, good), task.score(p, "no idea")
    assert s_good == {"reward": pytest.approx(1.1), "format": 1.0, "answer": 1.0}
    assert s_bad == {"reward": 0.0, "format": 0.0, "answer": 0.0}
    assert accuracy([s_good, s_bad, s_bad, s_good]) == 0.5
    assert accuracy([]) == 0.0
    tz = make_task(TaskConfig(name="countdown", reward="tinyzero"))
    assert tz.score(p, good) == {"reward": 1.0, "format": 1.0, "answer": 1.0}
    assert tz.score(p, "<answer>1 + 1</answer>")["reward"] == 0.1
    assert tz.score(p, "nothing")["reward"] == 0.0


def test_make_task_errors() -> None:
    with pytest.raises(ValueError, match="task.name='sudoku'"):
        make_task(TaskConfig(name="sudoku"))
    with pytest.raises(ValueError, match="task.reward"):
        make_task(TaskConfig(name="countdown", reward="gsm8k"))
    with pytest.raises(ValueError, match="task.template"):
        make_task(TaskConfig(name="countdown", template="jinja"))


# ---------------------------------------------------------------------------------------------
# Loaders

def _tinyzero_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        nums, target, _sol = generate_problem(rng)
        rows.append({"target": target, "nums": nums})
    return rows


def test_load_es_paper_json(tmp_path: Path) -> None:
    path = tmp_path / "countdown.json"
    path.write_text(json.dumps(PAPER_ROWS))
    rows = load_countdown_file(path)
    assert rows[0] == {"numbers": [44, 19, 35], "target": 98, "solution": "((44 + 19) + 35)", "id": "0"}
    assert rows[1]["target"] == 50


def test_load_jsonl_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _tinyzero_rows(50)
    jl = tmp_path / "cd.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pqf = tmp_path / "cd.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf)
    for path in (jl, pqf):
        loaded = load_countdown_file(path)
        assert [(r["numbers"], r["target"]) for r in loaded] == [(r["nums"], r["target"]) for r in rows]


@pytest.mark.parametrize(
    "bad_row, why",
    [
        ({"nums": [1, 2]}, "missing 'target'"),
        ({"target": 5}, "missing 'numbers'"),
        ({"nums": "1 2 3", "target": 5}, "list of integers"),
        ({"nums": [1, 2.5], "target": 5}, "non-negative integers"),
        ({"nums": [1, True], "target": 5}, "non-negative integers"),
        ({"nums": [], "target": 5}, "empty"),
        ({"nums": [1, 2], "target": "five"}, "target must be a number"),
        ([1, 2, 3], "expected an object"),
    ],
)
def test_malformed_row_names_file_and_row(tmp_path: Path, bad_row, why: str) -> None:
    rows: list = _tinyzero_rows(3)
    rows.insert(2, bad_row)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DatasetError, match=rf"bad\.jsonl: row 2 \(line 3\): .*{re.escape(why)}"):
        load_countdown_file(path)
    jpath = tmp_path / "bad.json"
    jpath.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match=rf"bad\.json: row 2: .*{re.escape(why)}"):
        load_countdown_file(jpath)


def test_malformed_parquet_and_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"target": 5, "nums": [1, 4]}, {"target": None, "nums": [2, 3]}]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DatasetError, match=r"bad\.parquet: row 1: target"):
        load_countdown_file(path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"nums": [1, 2], "target": 3}\n{"nums": [1, \n')
    with pytest.raises(DatasetError, match=r"broken\.jsonl: row 1 \(line 2\): not valid JSON"):
        load_countdown_file(broken)
    with pytest.raises(DatasetError, match="no such file"):
        load_countdown_file(tmp_path / "missing.json")
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown Countdown data format"):
        load_countdown_file(other)
    notparquet = tmp_path / "junk.parquet"
    notparquet.write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="junk.parquet"):
        load_countdown_file(notparquet)


def test_task_from_file(tmp_path: Path) -> None:
    rows = _tinyzero_rows(300, seed=1)
    path = tmp_path / "cd.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TaskConfig(name="countdown", data_path=str(path), template="raw", data_seed=3)
    task = make_task(cfg)
    ev = task.eval_problems(1000)
    assert 10 <= len(ev) <= 60  # ~10% of 300
    eval_keys = {_key(p) for p in ev}
    seen = set()
    for g in range(20):
        train = task.train_problems(g, 8)
        assert len({p.id for p in train}) == 8  # no repeats inside a generation
        for p in train:
            assert _key(p) not in eval_keys
            seen.add(p.id)
    assert [p.id for p in make_task(cfg).train_problems(4, 8)] == [p.id for p in task.train_problems(4, 8)]
    assert len(task.train_problems(0, 500)) == 500  # more than the file: reshuffled passes
    p = task.train_problems(0, 1)[0]
    assert p.id.startswith("cd.jsonl:") and p.prompt == raw_prompt(p.data["numbers"], p.data["target"])
