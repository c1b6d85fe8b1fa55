"""The one tag scan of Countdown completions: format score, answer block, answer span.

Every public scan (`format_reward`, `last_answer`) and every reward goes through `scan`, which
equals the published regexes (DOTALL) on every string, in linear time: the regexes themselves
go quadratic on adversarial text (many "<answer>" without a close, many "</think>\\n<answer>"
joints before a non-final "</answer>"). Only C-level `str.find`/`rfind` passes; a text
without '<' costs one memchr-speed pass.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
SEP = THINK_CLOSE + "\n" + ANSWER_OPEN  # the "</think>\n<answer>" joint of the full format
MAX_ANSWER_SPAN = 10_000  # longer <answer> blocks score 0 without being copied or stripped


class Scan(NamedTuple):
    format: float  # the ES paper's format score (1.0 / 0.1 think + 0.5 answer)
    has_answer: bool  # an <answer>...</answer> block exists
    span: Optional[tuple[int, int]]  # the LAST block's content (as re.findall pairs them), or None


def scan(text: str, start: int = 0, *, think_opened: bool = True,
         max_span: Optional[int] = MAX_ANSWER_SPAN) -> Scan:
    """Scan `text[start:]` (never copied).

    think_opened=True: the text follows an already open "<think>" (the prompt ends in it, or
    `text[:start]` is "<think>"): the format is that of "<think>" + text[start:], i.e.
    re.match(r"^<think>.*?</think>\\n<answer>.*?</answer>$") for 1.0. False: a plain text that
    does not start with "<think>" (no full format possible; a think block needs both tags).
    `span` is None without an answer block or when its content is longer than `max_span`
    (None = no limit); then it is never sliced, stripped or parsed.
    """
    c = text
    if c.find("<", start) == -1:
        return Scan(0.0, False, None)
    present, span = False, None
    close_last = c.rfind(ANSWER_CLOSE, start)
    if close_last != -1:
        q = c.rfind(ANSWER_OPEN, start, close_last)
        if q != -1:  # an answer block exists: the last "<answer>" before the last "</answer>"
            present = True
            # The last match ends at the first "</answer>" after q; only look max_span ahead.
            body = q + len(ANSWER_OPEN)
            end = c.find(ANSWER_CLOSE, body) if max_span is None else \
                c.find(ANSWER_CLOSE, body, body + max_span + len(ANSWER_CLOSE))
            if end != -1:
                first_open = c.find(ANSWER_OPEN, start, body)
                if first_open == q:  # the usual case: a single "<answer>"
                    begin = q
                else:  # findall searches again after the last "</answer>" that precedes q
                    p = c.rfind(ANSWER_CLOSE, start, q)
                    begin = c.find(ANSWER_OPEN, p + len(ANSWER_CLOSE)) if p != -1 else first_open
                begin += len(ANSWER_OPEN)
                if max_span is None or end - begin <= max_span:
                    span = (begin, end)
    if think_opened:
        t = c.find(THINK_CLOSE, start)
        think = t != -1
    else:
        i = c.find(THINK_OPEN, start)
        t, think = -1, i != -1 and c.find(THINK_CLOSE, i + len(THINK_OPEN)) != -1
    if think_opened and think and present:  # the full format: joint, answer block at the very end
        # `$` without MULTILINE matches at the end or before one final "\n".
        if c.endswith(ANSWER_CLOSE):
            tail = len(c) - len(ANSWER_CLOSE)
        elif c.endswith(ANSWER_CLOSE + "\n"):
            tail = len(c) - len(ANSWER_CLOSE) - 1
        else:
            tail = -1
        if tail != -1:
            j = c.find(SEP, t)  # the earliest joint (at or after the first "</think>") leaves the most room
            if j != -1 and j + len(SEP) <= tail:
                return Scan(1.0, True, span)
    return Scan((0.1 if think else 0.0) + (0.5 if present else 0.0), present, span)


def format_reward(response: str) -> float:
    """The ES paper's format score of a full response (already starting with "<think>").

    1.0 if re.match(r"^<think>.*?</think>\\n<answer>.*?</answer>$", response, re.DOTALL),
    else 0.1 if a think block is present plus 0.5 if an answer block is present.
    """
    if response.startswith(THINK_OPEN):
        return scan(response, len(THINK_OPEN), max_span=0).format
    return scan(response, think_opened=False, max_span=0).format


def format_after_think(completion: str) -> float:
    """format_reward("<think>" + completion) without copying the completion.

    No tag can straddle the "<think>" prefix and the completion ('<' only begins a tag).
    """
    return scan(completion, max_span=0).format


def last_answer(text: str) -> Optional[str]:
    """re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)[-1], or None when no match."""
    span = scan(text, max_span=None).span
    return None if span is None else text[span[0]:span[1]]
