"""Countdown: combine 3-4 numbers with + - * / (each once) to reach a target.

Follows two public references:

* the ES paper (Qiu et al. 2025, "Evolution Strategies at Scale: LLM Fine-Tuning Beyond
  Reinforcement Learning", github.com/VsonicV/es-fine-tuning-paper, countdown_task.py):
  raw-text prompt ending in "<think>", reward = 0.1 * format + answer;
* TinyZero (github.com/Jiayi-Pan/TinyZero, verl/utils/reward_score/countdown.py):
  0 with no answer, 0.1 for a wrong/invalid one, 1.0 for a correct one; Countdown-Tasks-3to4
  rows (`nums`, `target`).

Both references `eval` the model's answer. Here the answer is parsed by `eslora.tasks.expr`
(never executed): `**` and `//` score 0 on purpose, division by zero scores 0. The tag scans
use `str.find`/`rfind` only (no backtracking regex), so scoring is linear in the completion
length whatever it contains. See docs/tasks.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from eslora.tasks.base import Problem, accuracy, render_chat
from eslora.tasks.expr import check_expression, to_fraction

__all__ = [
    "CountdownTask",
    "DatasetError",
    "accuracy",
    "answer_reward",
    "es_paper_reward",
    "format_reward",
    "generate_problem",
    "last_answer",
    "load_countdown_file",
    "raw_prompt",
    "chat_prompt",
    "reachable",
    "solve",
    "tinyzero_reward",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_SEP = THINK_CLOSE + "\n" + ANSWER_OPEN  # the "</think>\n<answer>" joint of the full format

# ---------------------------------------------------------------------------------------------
# Tag scans. Each equals the reference regex (DOTALL) on every string, in linear time: the
# regexes themselves go quadratic on adversarial text (many "<answer>" without a close, many
# "</think>\n<answer>" joints before a non-final "</answer>").


def _block_present(text: str, open_tag: str, close_tag: str, start: int = 0) -> bool:
    """re.search(open + ".*?" + close, text, DOTALL) is not None."""
    i = text.find(open_tag, start)
    return i != -1 and text.find(close_tag, i + len(open_tag)) != -1


def _full_format_tail(text: str, start: int) -> bool:
    """`text[start:]` matches ".*?</think>\\n<answer>.*?</answer>$" (DOTALL, re.match)."""
    # `$` without MULTILINE matches at the end or before one final "\n".
    if text.endswith(ANSWER_CLOSE):
        end = len(text) - len(ANSWER_CLOSE)
    elif text.endswith(ANSWER_CLOSE + "\n"):
        end = len(text) - len(ANSWER_CLOSE) - 1
    else:
        return False
    j = text.find(_SEP, start)  # the earliest joint leaves the most room for the answer
    return j != -1 and j + len(_SEP) <= end


def format_reward(response: str) -> float:
    """The ES paper's format score of a full response (already starting with "<think>").

    1.0 if re.match(r"^<think>.*?</think>\\n<answer>.*?</answer>$", response, re.DOTALL),
    else 0.1 if a think block is present plus 0.5 if an answer block is present.
    """
    if response.startswith(THINK_OPEN) and _full_format_tail(response, len(THINK_OPEN)):
        return 1.0
    score = 0.0
    if _block_present(response, THINK_OPEN, THINK_CLOSE):
        score += 0.1
    if _block_present(response, ANSWER_OPEN, ANSWER_CLOSE):
        score += 0.5
    return score


def _format_after_think(completion: str) -> float:
    """format_reward("<think>" + completion) without copying the completion.

    No tag can straddle the "<think>" prefix and the completion ('<' only begins a tag), so:
    the think block is present iff "</think>" occurs in the completion, and the full format
    holds iff the completion alone matches the tail pattern.
    """
    if _full_format_tail(completion, 0):
        return 1.0
    score = 0.0
    if completion.find(THINK_CLOSE) != -1:
        score += 0.1
    if _block_present(completion, ANSWER_OPEN, ANSWER_CLOSE):
        score += 0.5
    return score


def last_answer(text: str) -> Optional[str]:
    """re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)[-1], or None when no match.

    Computed backwards in O(len(text)) with no Python-level loop. Tags cannot overlap one
    another, which makes this exact: q is the last "<answer>" before the last "</answer>";
    the last match ends at the first "</answer>" after q, and starts at the first "<answer>"
    after the last "</answer>" that precedes q (findall is "searching" again there).
    """
    close_last = text.rfind(ANSWER_CLOSE)
    if close_last == -1:
        return None
    q = text.rfind(ANSWER_OPEN, 0, close_last)
    if q == -1:
        return None
    p = text.rfind(ANSWER_CLOSE, 0, q)
    start = text.find(ANSWER_OPEN, p + len(ANSWER_CLOSE) if p != -1 else 0)
    end = text.find(ANSWER_CLOSE, q + len(ANSWER_OPEN))
    return text[start + len(ANSWER_OPEN) : end]


def _numbers_list(numbers: Iterable[Any]) -> list[int]:
    out = []
    for n in numbers:
        if isinstance(n, bool) or int(n) != n:
            raise ValueError(f"numbers must be integers, got {n!r}")
        out.append(int(n))
    return out


MAX_ANSWER_SPAN = 10_000  # longer <answer> blocks score 0 without being copied or stripped


def _scan(completion: str, max_span: int = MAX_ANSWER_SPAN) -> tuple[float, bool, Optional[tuple[int, int]]]:
    """(format_reward("<think>" + completion), an answer block exists, span of its content).

    The same results as `_format_after_think` and `last_answer` with the fewest passes over
    the text (each a C-level str.find/rfind; a text without '<' costs one memchr-speed pass).
    The span is None when there is no answer block or when the content is longer than
    `max_span` (then it is never sliced, stripped or parsed).
    """
    c = completion
    if "<" not in c:
        return 0.0, False, None
    present, span = False, None
    close_last = c.rfind(ANSWER_CLOSE)
    if close_last != -1:
        q = c.rfind(ANSWER_OPEN, 0, close_last)
        if q != -1:  # an answer block exists: the last "<answer>" before the last "</answer>"
            present = True
            # The last match ends at the first "</answer>" after q; only look max_span ahead.
            end = c.find(ANSWER_CLOSE, q + len(ANSWER_OPEN), q + len(ANSWER_OPEN) + max_span + len(ANSWER_CLOSE))
            if end != -1:
                first_open = c.find(ANSWER_OPEN, 0, q + len(ANSWER_OPEN))
                if first_open == q:  # the usual case: a single "<answer>"
                    start = q
                else:  # starts at the first "<answer>" after the last "</answer>" before q
                    p = c.rfind(ANSWER_CLOSE, 0, q)
                    start = c.find(ANSWER_OPEN, p + len(ANSWER_CLOSE)) if p != -1 else first_open
                start += len(ANSWER_OPEN)
                if end - start <= max_span:
                    span = (start, end)
    t = c.find(THINK_CLOSE)
    think = t != -1
    if think and present:  # the full format: "</think>\n<answer>" joint, answer block at the end
        if c.endswith(ANSWER_CLOSE):
            tail = len(c) - len(ANSWER_CLOSE)
        elif c.endswith(ANSWER_CLOSE + "\n"):
            tail = len(c) - len(ANSWER_CLOSE) - 1
        else:
            tail = -1
        if tail != -1:
            j = c.find(_SEP, t)  # the first joint is at or after the first "</think>"
            if j != -1 and j + len(_SEP) <= tail:
                return 1.0, True, span
    return (0.1 if think else 0.0) + (0.5 if present else 0.0), present, span


def _correct(completion: str, span: Optional[tuple[int, int]], numbers: list[int], target: Fraction) -> bool:
    if span is None:
        return False
    answer = completion[span[0] : span[1]].strip()
    return bool(answer) and check_expression(answer, numbers, target)


def _parts(completion: str, numbers: Sequence[Any], target: Any) -> tuple[float, float, bool]:
    """(ES format score, answer 0/1, an answer block exists) of one completion."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    nums, tgt = _numbers_list(numbers), to_fraction(target)
    fmt, present, span = _scan(completion)
    return fmt, float(_correct(completion, span, nums, tgt)), present


def answer_reward(completion: str, numbers: Sequence[Any], target: Any) -> float:
    """1.0 iff the LAST <answer> block uses exactly `numbers` (each once) and equals `target`."""
    return _parts(completion, numbers, target)[1]


def es_paper_reward(completion: str, numbers: Sequence[Any], target: Any) -> dict[str, float]:
    """The ES paper's Countdown reward of the text generated after the prompt's "<think>".

    Returns {"reward": 0.1 * format + answer, "format": ..., "answer": ...}; `format` is scored
    on "<think>" + completion. Never raises on a str completion.
    """
    fmt, ans, _ = _parts(completion, numbers, target)
    return {"reward": 0.1 * fmt + ans, "format": fmt, "answer": ans}


def tinyzero_reward(completion: str, numbers: Sequence[Any], target: Any) -> float:
    """TinyZero's Countdown reward: 0.0 without an <answer> block, 1.0 if the last one is
    correct, 0.1 otherwise (wrong numbers, wrong value, unparsable, division by zero)."""
    _, ans, has_answer = _parts(completion, numbers, target)
    if not has_answer:
        return 0.0
    return 1.0 if ans == 1.0 else 0.1


# ---------------------------------------------------------------------------------------------
# Prompts

SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process in your mind "
    "and then provide the user with the answer."
)
USER_PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
    "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
    "example <answer> (1 + 2) / 3 </answer>."
)
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"


def format_numbers(numbers: Sequence[int]) -> str:
    """numpy's str() of an int array, as in the ES paper's data: [44 19 35], [ 2 54 17]."""
    width = max((len(str(n)) for n in numbers), default=0)
    return "[" + " ".join(str(n).rjust(width) for n in numbers) + "]"


def format_target(target: Any) -> str:
    value = to_fraction(target)
    if value.denominator == 1:
        return str(value.numerator)
    return str(target).strip() if isinstance(target, str) else repr(float(value))


def user_prompt(numbers: Sequence[int], target: Any) -> str:
    return USER_PROMPT.format(numbers=format_numbers(numbers), target=format_target(target))


def raw_prompt(numbers: Sequence[int], target: Any) -> str:
    """The ES paper's raw-text prompt (its data's `context` field), ending in "<think>".

    The paper concatenates system text, question and assistant prefix with no separators.
    """
    return SYSTEM_PROMPT + user_prompt(numbers, target) + ASSISTANT_PREFIX


def chat_prompt(numbers: Sequence[int], target: Any, tokenizer: Any = None) -> str:
    """System + user turns through the tokenizer's chat template, then the assistant turn
    opened with "Let me solve this step by step.\\n<think>" (TinyZero's instruct layout).
    Without a chat template: "<system>\\nUser: <question>\\nAssistant: Let me solve ...<think>".
    """
    return render_chat(tokenizer, SYSTEM_PROMPT, user_prompt(numbers, target), ASSISTANT_PREFIX)


# ---------------------------------------------------------------------------------------------
# Exhaustive solver and procedural generator


# Exact rationals as reduced (p, q) int pairs, q > 0: several times faster than Fraction here.
def _rat(p: int, q: int) -> tuple[int, int]:
    if q < 0:
        p, q = -p, -q
    g = math.gcd(p, q)
    return (p // g, q // g) if g > 1 else (p, q)


def _combine(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[tuple[int, int], str, bool]]:
    """(value, operator, swapped) for a+b, a-b, b-a, a*b, a/b, b/a (no division by zero)."""
    (pa, qa), (pb, qb) = a, b
    if qa == 1 and qb == 1:
        out = [((pa + pb, 1), "+", False), ((pa - pb, 1), "-", False), ((pb - pa, 1), "-", True),
               ((pa * pb, 1), "*", False)]
    else:
        out = [(_rat(pa * qb + pb * qa, qa * qb), "+", False), (_rat(pa * qb - pb * qa, qa * qb), "-", False),
               (_rat(pb * qa - pa * qb, qa * qb), "-", True), (_rat(pa * pb, qa * qb), "*", False)]
    if pb != 0:
        out.append((_rat(pa * qb, qa * pb), "/", False))
    if pa != 0:
        out.append((_rat(pb * qa, qb * pa), "/", True))
    return out


def _walk(numbers: Sequence[int], keep: Any) -> dict[tuple[int, int], str]:
    """Values reachable using ALL numbers once -> one expression, for values with keep(value).

    Merging two items at a time covers every binary expression tree; intermediate values may
    be negative or fractional, as in the ES paper's data (e.g. "((83 - (78 / 39)) + 1)").
    Expressions of the final merge are only built for kept values.
    """
    found: dict[tuple[int, int], str] = {}
    items = [((int(n), 1), str(int(n))) for n in numbers]
    if len(items) == 1:
        if keep(items[0][0]):
            found[items[0][0]] = items[0][1]
        return found

    def rec(items: list[tuple[tuple[int, int], str]]) -> None:
        n = len(items)
        for i in range(n):
            for j in range(i + 1, n):
                (a, ea), (b, eb) = items[i], items[j]
                combos = _combine(a, b)
                if n == 2:
                    for v, op, swapped in combos:
                        if v not in found and keep(v):
                            found[v] = f"({eb} {op} {ea})" if swapped else f"({ea} {op} {eb})"
                    continue
                rest = [items[k] for k in range(n) if k != i and k != j]
                for v, op, swapped in combos:
                    rest.append((v, f"({eb} {op} {ea})" if swapped else f"({ea} {op} {eb})"))
                    rec(rest)
                    rest.pop()

    rec(items)
    return found


def reachable(numbers: Sequence[int]) -> dict[Fraction, str]:
    """Every value reachable using ALL `numbers` exactly once with + - * / -> one expression."""
    return {Fraction(p, q): e for (p, q), e in _walk(numbers, lambda v: True).items()}


def solve(numbers: Sequence[int], target: Any) -> Optional[str]:
    """An expression using all `numbers` once that equals `target` exactly, or None."""
    t = to_fraction(target)
    key = (t.numerator, t.denominator)
    return _walk(numbers, lambda v: v == key).get(key)


def _key(numbers: Sequence[int], target: Any) -> str:
    return f"{sorted(int(n) for n in numbers)}|{to_fraction(target)}"


def is_eval_problem(numbers: Sequence[int], target: Any, eval_fraction: float) -> bool:
    """The fixed train/eval partition: a hash of the problem (numbers as a multiset, target).

    Independent of any seed, so the held-out set never meets a train problem, whatever
    `data_seed` or generation draws it, and is the same for every run on the same data.
    """
    h = hashlib.blake2b(("eslora-countdown|" + _key(numbers, target)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") % 1_000_000 < eval_fraction * 1_000_000


def generate_problem(
    rng: random.Random,
    num_numbers: tuple[int, int] = (3, 4),
    number_range: tuple[int, int] = (1, 99),
    target_range: tuple[int, int] = (10, 100),
    accept: Any = None,
    max_tries: int = 10_000,
) -> tuple[list[int], int, str]:
    """(numbers, target, solution): numbers drawn uniformly (repeats allowed, as in TinyZero),
    target uniform among the integers in `target_range` reachable with all of them, so every
    problem is solvable by construction. `accept(numbers, target)` may veto a target."""
    lo_t, hi_t = target_range
    for _ in range(max_tries):
        k = rng.randint(*num_numbers)
        nums = [rng.randint(*number_range) for _ in range(k)]
        reach = _walk(nums, lambda v: v[1] == 1 and lo_t <= v[0] <= hi_t)
        targets = sorted(p for p, _q in reach if accept is None or accept(nums, p))
        if targets:
            t = rng.choice(targets)
            return nums, t, reach[(t, 1)]
    raise RuntimeError(
        f"no solvable Countdown problem in {max_tries} draws: num_numbers={num_numbers}, "
        f"number_range={number_range}, target_range={target_range}"
    )


# ---------------------------------------------------------------------------------------------
# Loaders


class DatasetError(ValueError):
    """A Countdown data file or row that cannot be used; the message names file and row."""


def _normalize_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
    numbers = row.get("numbers", row.get("nums"))
    if numbers is None:
        raise DatasetError(f"{where}: missing 'numbers' (ES paper) or 'nums' (TinyZero)")
    if isinstance(numbers, (str, bytes)) or not hasattr(numbers, "__iter__"):
        raise DatasetError(f"{where}: numbers must be a list of integers, got {numbers!r}")
    nums = list(numbers)
    if not nums:
        raise DatasetError(f"{where}: numbers is empty")
    clean = []
    for n in nums:
        ok = not isinstance(n, (bool, str, bytes))
        try:
            ok = ok and int(n) == n and n >= 0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise DatasetError(f"{where}: numbers must be non-negative integers, got {nums!r}")
        clean.append(int(n))
    if "target" not in row:
        raise DatasetError(f"{where}: missing 'target'")
    try:
        value = to_fraction(row["target"])
    except ValueError:
        raise DatasetError(f"{where}: target must be a number, got {row['target']!r}") from None
    target: Any = int(value) if value.denominator == 1 else float(value)
    out: dict[str, Any] = {"numbers": clean, "target": target}
    solution = row.get("solution")
    if solution is not None:
        out["solution"] = str(solution)
    if row.get("id") is not None:
        out["id"] = str(row["id"])
    return out


def load_countdown_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows {"numbers", "target", ["solution", "id"]} from a Countdown data file.

    * `.json`: a list of objects, the ES paper's format (id, context, numbers, target as a
      string, solution); objects with TinyZero's `nums` are accepted too.
    * `.jsonl`: one object per line (TinyZero's Countdown-Tasks-3to4 exported as JSON lines).
    * `.parquet`: TinyZero's Countdown-Tasks-3to4 files (columns `nums`, `target`), via pyarrow.

    A malformed row raises DatasetError naming the file and the row (0-based; JSONL also
    gives the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{path}: not valid JSON: {err}") from None
        if isinstance(data, Mapping) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        rows = [_normalize_row(r, f"{path}: row {i}") for i, r in enumerate(data)]
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}: row {len(rows)} (line {line_no})"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{where}: not valid JSON: {err}") from None
                rows.append(_normalize_row(obj, where))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow is a test dependency
            raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types
            raise DatasetError(f"{path}: not a readable parquet file: {err}") from None
        rows = [_normalize_row(r, f"{path}: row {i}") for i, r in enumerate(table.to_pylist())]
    else:
        raise DatasetError(f"{path}: unknown Countdown data format {suffix!r}; use .json, .jsonl or .parquet")
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------------------------------------
# The task


class CountdownTask:
    """Countdown problems (procedural or from a file), prompts and rewards.

    * train_problems(generation, n): fresh problems each generation, drawn from
      (data_seed, generation) only; every ES member of a generation gets the same list.
    * eval_problems(n): a fixed held-out list (prefix-stable in n), disjoint from every train
      problem via `is_eval_problem` (hash partition, ~`eval_fraction` of the problem space).
    * score: {"reward", "format", "answer"}; `reward` is the ES paper's or TinyZero's
      (`reward=`), `format` is always the ES paper's format part, `answer` is 0/1 correctness
      (identical under both rules), so metrics compare across reward choices.
    """

    name = "countdown"

    def __init__(
        self,
        *,
        template: str = "chat",
        reward: str = "es_paper",
        data_path: str = "",
        data_seed: int = 1234,
        tokenizer: Any = None,
        num_numbers: tuple[int, int] = (3, 4),
        number_range: tuple[int, int] = (1, 99),
        target_range: tuple[int, int] = (10, 100),
        eval_fraction: float = 0.1,
    ) -> None:
        if template not in ("chat", "raw"):
            raise ValueError(f"task.template={template!r}: use chat or raw")
        if reward not in ("es_paper", "tinyzero"):
            raise ValueError(f"task.reward={reward!r}: use es_paper or tinyzero")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={eval_fraction!r} must be in (0, 1)")
        if not (1 <= num_numbers[0] <= num_numbers[1] and number_range[0] <= number_range[1]
                and target_range[0] <= target_range[1]):
            raise ValueError(f"bad generator ranges {num_numbers}, {number_range}, {target_range}")
        self.template, self.reward, self.data_seed = template, reward, int(data_seed)
        self.tokenizer = tokenizer
        self.num_numbers, self.number_range, self.target_range = num_numbers, number_range, target_range
        self.eval_fraction = eval_fraction
        self.data_path = data_path
        self._eval_cache: list[Problem] = []  # eval_problems is prefix-stable: keep the longest
        self._train_rows: list[dict[str, Any]] = []
        self._eval_rows: list[dict[str, Any]] = []
        if data_path:
            name = Path(data_path).name
            for i, row in enumerate(load_countdown_file(data_path)):
                row = dict(row, id=f"{name}:{i}")
                bucket = self._eval_rows if is_eval_problem(row["numbers"], row["target"], eval_fraction) \
                    else self._train_rows
                bucket.append(row)
            if not self._train_rows:
                raise DatasetError(f"{data_path}: every row fell in the held-out split; need more rows")

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any = None) -> "CountdownTask":
        return cls(template=cfg.template, reward=cfg.reward, data_path=cfg.data_path,
                   data_seed=cfg.data_seed, tokenizer=tokenizer)

    # -- prompts -----------------------------------------------------------------------------
    def prompt(self, numbers: Sequence[int], target: Any) -> str:
        if self.template == "raw":
            return raw_prompt(numbers, target)
        return chat_prompt(numbers, target, self.tokenizer)

    def _problem(self, row: Mapping[str, Any], pid: str) -> Problem:
        data = {"numbers": list(row["numbers"]), "target": row["target"]}
        if "solution" in row:
            data["solution"] = row["solution"]
        return Problem(prompt=self.prompt(data["numbers"], data["target"]), data=data, id=pid)

    # -- problems ----------------------------------------------------------------------------
    def _generate(self, rng: random.Random, n: int, want_eval: bool, tag: str) -> list[Problem]:
        seen: set[str] = set()
        out: list[Problem] = []

        def accept(nums: list[int], t: int) -> bool:
            return is_eval_problem(nums, t, self.eval_fraction) == want_eval and _key(nums, t) not in seen

        while len(out) < n:
            nums, target, solution = generate_problem(
                rng, self.num_numbers, self.number_range, self.target_range, accept=accept)
            seen.add(_key(nums, target))
            out.append(self._problem({"numbers": nums, "target": target, "solution": solution},
                                     f"{tag}:{len(out)}"))
        return out

    def train_problems(self, generation: int, n: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        # A string seed is hashed with SHA-512 by `random`: stable across processes/platforms.
        rng = random.Random(f"eslora-countdown-train|{self.data_seed}|{int(generation)}")
        if not self.data_path:
            return self._generate(rng, n, want_eval=False, tag=f"gen:g{int(generation)}")
        rows = self._train_rows
        picks: list[int] = []
        while len(picks) < n:  # without replacement, reshuffling only when the file runs out
            picks.extend(rng.sample(range(len(rows)), min(len(rows), n - len(picks))))
        return [self._problem(rows[i], rows[i]["id"]) for i in picks]

    def eval_problems(self, n: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        if len(self._eval_cache) < n:
            if not self.data_path:
                # Fixed stream, independent of data_seed: runs with different seeds share one eval set.
                self._eval_cache = self._generate(random.Random("eslora-countdown-eval"), n, want_eval=True,
                                                  tag="gen:eval")
            else:
                self._eval_cache = [self._problem(r, r["id"]) for r in self._eval_rows[:n]]
        return self._eval_cache[:n]

    # -- reward ------------------------------------------------------------------------------
    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        fmt, ans, has_answer = _parts(completion, problem.data["numbers"], problem.data["target"])
        if self.reward == "es_paper":
            reward = 0.1 * fmt + ans
        else:
            reward = 0.0 if not has_answer else (1.0 if ans == 1.0 else 0.1)
        return {"reward": reward, "format": fmt, "answer": ans}

