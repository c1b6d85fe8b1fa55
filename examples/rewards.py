"""TRL-style reward functions for the generic `prompts` task (see prompts.yaml).

Each is called like TRL's GRPOTrainer calls one: `fn(prompts=[...], completions=[...], **columns)`
with the dataset's other columns as lists, and returns one float per completion.
"""

from __future__ import annotations

import re


def mentions_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the completion contains the row's `answer` column as a whole word (any case)."""
    return [1.0 if re.search(rf"(?<![0-9A-Za-z]){re.escape(str(a))}(?![0-9A-Za-z])", c, re.IGNORECASE) else 0.0
            for c, a in zip(completions, answer)]


def brevity(completions, **kwargs) -> list[float]:
    """Shorter is better: 1 for an empty answer, 0.5 at 40 characters, towards 0 beyond."""
    return [40.0 / (40.0 + len(c.strip())) for c in completions]
