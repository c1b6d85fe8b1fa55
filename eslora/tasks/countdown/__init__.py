"""Countdown: combine 3-4 numbers with + - * / (each once) to reach a target.

Follows two public references:

* the ES paper (Qiu et al. 2025, "Evolution Strategies at Scale: LLM Fine-Tuning Beyond
  Reinforcement Learning", github.com/VsonicV/es-fine-tuning-paper, countdown_task.py):
  raw-text prompt ending in "<think>", reward = 0.1 * format + answer;
* TinyZero (github.com/Jiayi-Pan/TinyZero, verl/utils/reward_score/countdown.py):
  0 with no answer, 0.1 for a wrong/invalid one, 1.0 for a correct one; Countdown-Tasks-3to4
  rows (`nums`, `target`).

| module | what |
|---|---|
| `scan.py` | the one tag scan (format score, answer block), linear time |
| `rewards.py` | the one reward table (`REWARDS`) and the public reward functions |
| `prompts.py` | the ES paper's raw prompt and the chat layout |
| `generator.py` | the exhaustive solver and the procedural generator |
| `data.py` | file loaders, problem key, the seed-free hash train/eval partition |
| `task.py` | `CountdownTask`: the protocol options, problems, score |

See docs/tasks.md.
"""

from __future__ import annotations

from eslora.tasks.base import DatasetError, accuracy
from eslora.tasks.countdown.data import is_eval_problem, load_countdown_file, problem_key
from eslora.tasks.countdown.generator import generate_problem, reachable, solve
from eslora.tasks.countdown.prompts import (ASSISTANT_PREFIX, SYSTEM_PROMPT, USER_PROMPT, chat_prompt,
                                            format_numbers, format_target, raw_prompt, user_prompt)
from eslora.tasks.countdown.rewards import REWARDS, answer_reward, es_paper_reward, score, tinyzero_reward
from eslora.tasks.countdown.scan import MAX_ANSWER_SPAN, format_after_think, format_reward, last_answer, scan
from eslora.tasks.countdown.task import CountdownTask

__all__ = [
    "ASSISTANT_PREFIX", "CountdownTask", "DatasetError", "MAX_ANSWER_SPAN", "REWARDS", "SYSTEM_PROMPT",
    "USER_PROMPT", "accuracy", "answer_reward", "chat_prompt", "es_paper_reward", "format_after_think",
    "format_numbers", "format_reward", "format_target", "generate_problem", "is_eval_problem", "last_answer",
    "load_countdown_file", "problem_key", "raw_prompt", "reachable", "scan", "score", "solve", "tinyzero_reward",
    "user_prompt",
]
