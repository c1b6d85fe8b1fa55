"""Conciseness task (ES paper): the reference reward (correct answers only, shorter = better), the
brevity-only length reward, fixed train questions, held-out eval."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eslora.config import ConfigError, TaskConfig, load_config
from eslora.tasks import ConcisenessTask, Problem, Task, accuracy, make_task
from eslora.tasks.conciseness import (EVAL, QUESTIONS, TRAIN, contains_answer, length_reward,
                                      reference_reward)
from chatml import CHATML, chatml_tokenizer


def test_question_list() -> None:
    assert len(QUESTIONS) >= 50
    assert len({q for q, _ in QUESTIONS}) == len(QUESTIONS)  # no duplicate questions
    assert all(q.strip() and a.strip() for q, a in QUESTIONS)
    assert not {q for q, _ in TRAIN} & {q for q, _ in EVAL}
    assert len(EVAL) >= 15


def test_reward_is_dense_and_unclipped() -> None:
    task = ConcisenessTask(template="raw", target_length=20)
    p = task.train_problems(0, 1)[0]
    rewards = [task.score(p, "x" * n)["reward"] for n in range(0, 200)]
    assert rewards[20] == 0.0
    assert rewards[0] == -20.0 and rewards[199] == -179.0
    # strictly better as the length approaches the target from either side: no plateaus
    assert all(a < b for a, b in zip(rewards[:20], rewards[1:21]))
    assert all(a > b for a, b in zip(rewards[20:], rewards[21:]))
    assert task.score(p, "  \n" + "x" * 20 + "\n ")["reward"] == 0.0  # surrounding whitespace ignored
    assert task.score(p, "x" * 25)["length"] == 25.0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.integers(min_value=0, max_value=300))
def test_reward_formula(text: str, target: int) -> None:
    assert length_reward(text, target) == -abs(len(text.strip()) - target)


PARIS = Problem(prompt="What is the capital of France?", data={"question": "q", "answer": "Paris"})


def test_reference_reward_values() -> None:
    task = ConcisenessTask(template="raw", reward="reference", length_scale=20)
    reward = lambda text: task.score(PARIS, text)["reward"]  # noqa: E731
    assert reward("Paris") == 2.0 and reward(" paris \n") == 2.0  # exactly the reference
    assert reward("The capital of France is Paris.") == pytest.approx(1 + 20 / (20 + 26))
    assert reward("Paris" + "." * 20) == 1.5  # length_scale characters too many halve the brevity part
    assert reward("Rome") == reward("") == reward("Parisian") == 0.0  # wrong, empty, not the word
    assert ConcisenessTask(template="raw", reward="reference", length_scale=5).score(PARIS, "Paris" + "." * 5)["reward"] == 1.5
    # among correct answers, every character fewer scores strictly better: a dense length signal;
    # the longest correct answer still beats a wrong one by more than any shortening can pay
    correct = [reward("Paris" + "!" * n) for n in range(200)]
    assert all(a > b > 1 for a, b in zip(correct, correct[1:]))
    assert correct[-1] - reward("Rome") > correct[0] - correct[-1]


def test_reference_reward_cannot_be_bought_by_dropping_the_answer() -> None:
    """The brevity-only reward prefers a short wrong answer (what taught the old demo empty
    answers); the reference reward ranks every correct answer above every wrong one."""
    long_right, short_wrong = "The capital of France is Paris, a city on the Seine.", "Rome."
    length = ConcisenessTask(template="raw", reward="length", target_length=20)
    assert length.score(PARIS, short_wrong)["reward"] > length.score(PARIS, long_right)["reward"]
    assert length.score(PARIS, "")["reward"] > length.score(PARIS, "Paris" + "." * 60)["reward"]
    reference = ConcisenessTask(template="raw", reward="reference")
    assert reference.score(PARIS, long_right)["reward"] > reference.score(PARIS, short_wrong)["reward"] == 0.0
    assert reference.score(PARIS, "Paris" + "." * 60)["reward"] > reference.score(PARIS, "")["reward"]
    assert reference.score(PARIS, long_right)["answer"] == 1.0 and reference.score(PARIS, short_wrong)["answer"] == 0.0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.sampled_from([a for _, a in QUESTIONS]), st.floats(0.5, 500))
def test_reference_reward_formula(text: str, answer: str, scale: float) -> None:
    got = reference_reward(text, answer, scale)
    if contains_answer(text, answer):
        assert got == 1 + scale / (scale + abs(len(text.strip()) - len(answer))) and 1 < got <= 2
    else:
        assert got == 0.0


def test_reward_keys_and_validation() -> None:
    reference = make_task(TaskConfig(name="conciseness", conciseness_reward="reference", length_scale=10))
    assert reference.score(PARIS, "Paris" + "." * 10)["reward"] == 1.5
    assert make_task(TaskConfig(name="conciseness")).score(PARIS, "x" * 20)["reward"] == 0.0  # default: length
    ConcisenessTask.validate_config(TaskConfig(name="conciseness", conciseness_reward="reference"))
    for key, value in (("conciseness_reward", "brevity"), ("length_scale", 0.0), ("length_scale", -1.0),
                       ("length_scale", float("nan")), ("length_scale", float("inf")), ("target_length", -1)):
        cfg = TaskConfig(name="conciseness", **{key: value})
        with pytest.raises(ValueError, match=f"task.{key}"):
            ConcisenessTask.validate_config(cfg)
        with pytest.raises(ValueError, match=f"task.{key}"):
            make_task(cfg)


def test_bad_conciseness_keys_fail_at_load() -> None:
    for override, key in (("task.conciseness_reward=brevity", "task.conciseness_reward"),
                          ("task.length_scale=0", "task.length_scale")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_the_demo_uses_the_reference_reward() -> None:
    """`make demo` trains on the reward that cannot be bought by damage, scored on all 20 held-out
    questions before and after training."""
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    assert cfg.task.name == "conciseness" and cfg.task.conciseness_reward == "reference"
    assert cfg.task.eval_prompts >= len(EVAL) and cfg.run.eval_every >= 1


def test_answer_part() -> None:
    assert contains_answer("The capital of France is Paris.", "Paris")
    assert contains_answer("paris", "Paris")
    assert not contains_answer("Parisian food", "Paris")
    assert contains_answer("It is 8.", "8") and not contains_answer("It is 18.", "8")
    assert contains_answer("It's carbon dioxide!", "Carbon dioxide")
    task = ConcisenessTask(template="raw")
    p = Problem(prompt="What is the capital of France?", data={"question": "q", "answer": "Paris"})
    scores = [task.score(p, "Paris."), task.score(p, "London.")]
    assert [s["answer"] for s in scores] == [1.0, 0.0] and accuracy(scores) == 0.5
    for evil in ("\x00" * 1000, "(" * 10_000, "٣" * 1000, ""):
        assert set(task.score(p, evil)) == {"reward", "length", "answer"}


def test_train_problems_fixed_and_seeded() -> None:
    cfg = TaskConfig(name="conciseness", template="raw", num_prompts=8, data_seed=1)
    task = make_task(cfg)
    assert isinstance(task, Task) and task.name == "conciseness"
    g0 = task.train_problems(0, 8)
    assert g0 == task.train_problems(7, 8) == make_task(cfg).train_problems(0, 8)
    assert len({p.id for p in g0}) == 8
    assert all(p.prompt == p.data["question"] for p in g0)  # raw: the bare question (ES paper)
    other = make_task(TaskConfig(name="conciseness", template="raw", data_seed=2)).train_problems(0, 8)
    assert [p.id for p in other] != [p.id for p in g0]
    assert len(task.train_problems(0, len(TRAIN) + 5)) == len(TRAIN) + 5  # cycles past the end
    ev = task.eval_problems(64)
    assert len(ev) == len(EVAL) and task.eval_problems(3) == ev[:3]
    assert not {p.data["question"] for p in ev} & {q for q, _ in TRAIN}


def test_chat_prompts() -> None:
    task = make_task(TaskConfig(name="conciseness", template="chat"), chatml_tokenizer(CHATML))
    p = task.train_problems(0, 1)[0]
    assert p.prompt == f"<|im_start|>user\n{p.data['question']}<|im_end|>\n<|im_start|>assistant\n"
    plain = make_task(TaskConfig(name="conciseness", template="chat")).train_problems(0, 1)[0]
    assert plain.prompt == f"User: {plain.data['question']}\nAssistant:"


def test_make_task_errors() -> None:
    with pytest.raises(ValueError, match="task.template"):
        make_task(TaskConfig(name="conciseness", template="xml"))
    with pytest.raises(ValueError, match="task.data_path"):
        make_task(TaskConfig(name="conciseness", data_path="x.json"))
    with pytest.raises(ValueError, match="task.eval_rows='0:5': the conciseness task ships its own questions"):
        make_task(TaskConfig(name="conciseness", eval_rows="0:5"))  # as load_config says, not silently ignored
    with pytest.raises(ValueError, match="unknown task"):
        make_task(TaskConfig(name="gsm8k"))


@pytest.mark.slow
def test_prompts_with_the_real_smollm2_tokenizer(smollm2_path) -> None:
    """The CPU demo's model: its ChatML template renders both tasks' prompts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    p = make_task(TaskConfig(name="conciseness", template="chat"), tok).train_problems(0, 1)[0]
    assert p.prompt.endswith(f"<|im_start|>user\n{p.data['question']}<|im_end|>\n<|im_start|>assistant\n")
    c = make_task(TaskConfig(name="countdown", template="chat"), tok).train_problems(0, 1)[0]
    assert "<|im_start|>system\nYou are a helpful assistant." in c.prompt
    assert c.prompt.endswith("<|im_end|>\n<|im_start|>assistant\nLet me solve this step by step.\n<think>")
