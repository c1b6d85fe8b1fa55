"""A bounded arithmetic parser for Countdown answers: model output is untrusted input.

The reference ES code (Qiu et al., "Evolution Strategies at Scale", countdown_task.py) and
TinyZero both filter characters and then call Python's `eval` on the model's answer. A
completion such as `99**80**50**2` passes that filter and never returns. This module never
executes anything: it tokenises and parses with a hand-written recursive-descent parser over

    expr    := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := ("+" | "-") unary | primary
    primary := INT | "(" expr ")"

and evaluates exactly with `fractions.Fraction`. Deliberate differences from `eval`:

* `**` (power) and `//` (floor division) are not Countdown operations: they are rejected.
* Only ASCII digits; no decimals, no `_` separators, no unicode digits.
* Bounded: at most `MAX_EXPR_CHARS` characters and `MAX_DEPTH` nested parentheses/unary signs,
  so work per expression is O(MAX_EXPR_CHARS) whatever the text.

Integer literals follow Python's rule (no leading zeros except for "0", "00", ...), so an
answer like "05 + 3" is rejected here as it is by `eval` (SyntaxError) in the references.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_EXPR_CHARS = 1000  # a 4-number Countdown answer needs ~30 characters
MAX_DEPTH = 64  # nested "(" plus unary signs; keeps recursion far below Python's limit

# One token, optional leading ASCII whitespace. `**` and `//` are matched as their own tokens
# so that they are rejected explicitly rather than read as two operators.
_TOKEN = re.compile(r"[ \t\n\r\f\v]*(?:([0-9]+)|(\*\*|//|[-+*/()]))")
_TRAILING_WS = re.compile(r"[ \t\n\r\f\v]*\Z")
_PY_INT = re.compile(r"[1-9][0-9]*|0+")  # Python's decinteger (without underscores)


class ExprError(ValueError):
    """The text is not an accepted Countdown expression."""


def tokenize(text: str, max_chars: int = MAX_EXPR_CHARS) -> list[str]:
    """ASCII tokens of `text`; raises ExprError on anything outside ints, + - * / ( )."""
    if not isinstance(text, str):
        raise ExprError(f"expected str, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ExprError(f"expression longer than {max_chars} characters")
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            if _TRAILING_WS.match(text, pos):
                break
            raise ExprError(f"unexpected character {text[pos]!r} at {pos}")
        num, op = m.group(1), m.group(2)
        if num is not None:
            if not _PY_INT.fullmatch(num):
                raise ExprError(f"invalid integer literal {num!r} (leading zero)")
            tokens.append(num)
        elif op in ("**", "//"):
            raise ExprError(f"{op!r} is not a Countdown operation")
        else:
            tokens.append(op)
        pos = m.end()
    if not tokens:
        raise ExprError("empty expression")
    return tokens


class _Parser:
    __slots__ = ("tokens", "i", "depth", "max_depth")

    def __init__(self, tokens: list[str], max_depth: int) -> None:
        self.tokens = tokens
        self.i = 0
        self.depth = 0
        self.max_depth = max_depth

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def parse(self) -> Fraction:
        value = self.expr()
        if self.i != len(self.tokens):
            raise ExprError(f"unexpected token {self.tokens[self.i]!r}")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while (tok := self.peek()) in ("+", "-"):
            self.i += 1
            rhs = self.term()
            value = value + rhs if tok == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while (tok := self.peek()) in ("*", "/"):
            self.i += 1
            rhs = self.unary()
            if tok == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise ExprError("division by zero")
                value = value / rhs
        return value

    def enter(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise ExprError(f"nesting deeper than {self.max_depth}")

    def unary(self) -> Fraction:
        tok = self.peek()
        if tok in ("+", "-"):
            self.i += 1
            self.enter()
            value = self.unary()
            self.depth -= 1
            return -value if tok == "-" else value
        return self.primary()

    def primary(self) -> Fraction:
        tok = self.peek()
        if tok is None:
            raise ExprError("unexpected end of expression")
        if tok == "(":
            self.i += 1
            self.enter()
            value = self.expr()
            self.depth -= 1
            if self.peek() != ")":
                raise ExprError("missing ')'")
            self.i += 1
            return value
        if tok[0].isdigit():  # tokens are ASCII-only here
            self.i += 1
            return Fraction(int(tok))
        raise ExprError(f"unexpected token {tok!r}")


def numbers_in(tokens: list[str]) -> list[int]:
    """The integer literals of a token list, in order."""
    return [int(t) for t in tokens if t[0].isdigit()]


def evaluate(text: str, max_chars: int = MAX_EXPR_CHARS, max_depth: int = MAX_DEPTH) -> Fraction:
    """Exact value of an arithmetic expression; raises ExprError for anything not accepted."""
    return _Parser(tokenize(text, max_chars), max_depth).parse()


def to_fraction(x: object) -> Fraction:
    """A target as an exact number: int, float, Fraction or a numeric string ("98", "27.4")."""
    if isinstance(x, bool):
        raise ValueError(f"target must be a number, got {x!r}")
    if isinstance(x, (int, Fraction)):
        return Fraction(x)
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            raise ValueError(f"target must be finite, got {x!r}")
        return Fraction(x)
    if isinstance(x, str):
        try:
            return Fraction(x.strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"target must be a number, got {x!r}") from None
    try:  # numpy scalars and the like
        return Fraction(int(x)) if int(x) == x else Fraction(float(x))  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"target must be a number, got {x!r}") from None


TOLERANCE = Fraction(1, 100_000)  # the references' abs(result - target) < 1e-5


def check_expression(text: str, numbers: list[int], target: Fraction) -> bool:
    """True iff `text` uses exactly `numbers` (each once, any order) and equals `target` within 1e-5.

    Never raises on any str: every parse/arith problem is simply "not correct".
    """
    try:
        tokens = tokenize(text)
        # Numbers first (as the references do): cheap, and it bounds the literals evaluated.
        if sorted(numbers_in(tokens)) != sorted(numbers):
            return False
        value = _Parser(tokens, MAX_DEPTH).parse()
    except ExprError:
        return False
    return abs(value - target) < TOLERANCE
