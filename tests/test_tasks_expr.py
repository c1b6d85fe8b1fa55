"""The bounded Countdown expression parser: exact values, rejections, never executes anything."""

from __future__ import annotations

import ast
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eslora.tasks import expr
from eslora.tasks.expr import MAX_DEPTH, ExprError, check_expression, evaluate, to_fraction, tokenize


@pytest.mark.parametrize(
    "text, value",
    [
        ("1", 1),
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("(1 + 2) / 3", 1),
        ("10 - 4 - 3", 3),  # left-associative
        ("48 / 4 / 2", 6),
        ("78 / 39", 2),
        ("1 / 3", Fraction(1, 3)),
        ("-3 + 5", 2),
        ("-(3 - 5)", 2),
        ("+4", 4),
        ("--4", 4),
        ("2 * -3", -6),
        ("\n 44 +\t19 + 35 \n", 98),
        ("0", 0),
        ("00", 0),  # Python's decinteger allows "0"+, like eval
        ("((((7))))", 7),
        ("((83 - (78 / 39)) + 1)", 82),
    ],
)
def test_values(text: str, value: object) -> None:
    assert evaluate(text) == Fraction(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "", "   ", "2**3", "2 ** 3", "7//2", "99**80**50**2", "1/0", "5/(3-3)", "1 2", "(1", "1)",
        "()", "2(3)", "(1)(2)", "1+", "*2", "05 + 3", "1.5", "1e3", "0x1F", "1_000", "abs(-1)",
        "__import__('os')", "lambda: 0", "().__class__", "x", "1 = 1", "٣ + 4", "１ + 2", "1\x00+2",
        "1 % 2", "1 ^ 2", "[1]", "1,2", "\u00a01+2",
    ],
)
def test_rejected(text: str) -> None:
    with pytest.raises(ExprError):
        evaluate(text)


def test_bounds() -> None:
    deep = "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(ExprError, match="nesting"):
        evaluate(deep)
    ok = "(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH
    assert evaluate(ok) == 1
    with pytest.raises(ExprError, match="nesting"):
        evaluate("-" * (MAX_DEPTH + 1) + "1")
    with pytest.raises(ExprError, match="longer"):
        evaluate("1+" * 600 + "1")
    # Deep nesting far beyond the recursion limit within the length bound: a clean rejection.
    with pytest.raises(ExprError):
        evaluate("(" * 999 + "1")


def test_check_expression() -> None:
    assert check_expression("(44 + 19) + 35", [44, 19, 35], Fraction(98))
    assert check_expression("35 + 44 + 19", [19, 35, 44], Fraction(98))
    assert not check_expression("44 + 19 + 35", [44, 19, 36], Fraction(98))
    assert not check_expression("44 + 44 + 10", [44, 10], Fraction(98))  # reuse
    assert not check_expression("44 + 19", [44, 19, 35], Fraction(63))  # missing number
    assert not check_expression("1 / 0 + 2", [1, 0, 2], Fraction(2))
    assert check_expression("137 / 5", [137, 5], Fraction("27.4"))
    # Tolerance 1e-5 as in the references (abs(result - target) < 1e-5).
    assert check_expression("1 / 3", [1, 3], Fraction(333333, 1000000))
    assert not check_expression("1 / 3", [1, 3], Fraction(3333, 10000))


def test_to_fraction() -> None:
    assert to_fraction("98") == 98
    assert to_fraction(" 27.4 ") == Fraction("27.4")
    assert to_fraction(5) == 5
    assert to_fraction(2.5) == Fraction(5, 2)
    for bad in ("x", True, float("nan"), None, "1/0"):
        with pytest.raises(ValueError):
            to_fraction(bad)


# ---------------------------------------------------------------------------------------------
# Differential check against an exact tree evaluation (no eval anywhere).

def _trees() -> st.SearchStrategy:
    leaf = st.integers(min_value=0, max_value=120).map(lambda n: (str(n), Fraction(n)))

    def extend(children: st.SearchStrategy) -> st.SearchStrategy:
        def binop(args):
            (ta, va), op, (tb, vb), sp = args
            if va is None or vb is None:
                value = None
            elif op == "+":
                value = va + vb
            elif op == "-":
                value = va - vb
            elif op == "*":
                value = va * vb
            elif op == "/":
                value = None if vb == 0 else va / vb
            else:  # ** and // are rejected by design
                value = None
            return (f"({ta}{sp}{op}{sp}{tb})", value)

        def neg(args):
            t, v = args
            return (f"-{t}", None if v is None else -v)

        return st.one_of(
            st.tuples(children, st.sampled_from(["+", "-", "*", "/", "**", "//"]), children,
                      st.sampled_from(["", " ", "\n"])).map(binop),
            children.map(neg),
        )

    return st.recursive(leaf, extend, max_leaves=8)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees())
def test_matches_exact_tree_value(tree) -> None:
    text, value = tree
    if value is None:
        with pytest.raises(ExprError):
            evaluate(text)
    else:
        assert evaluate(text) == value


@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=200))
def test_any_text_value_or_exprerror(text: str) -> None:
    try:
        v = evaluate(text)
    except ExprError:
        return
    assert isinstance(v, Fraction)
    # Whatever was accepted consists only of ASCII digits, operators, parens and whitespace.
    assert set(text) <= set("0123456789+-*/() \t\n\r\f\v")


def test_tokenize_only_ascii() -> None:
    assert tokenize(" 12+(3) ") == ["12", "+", "(", "3", ")"]


def test_no_eval_exec_compile_in_tasks_package() -> None:
    """Static guard: nothing under eslora/tasks calls eval/exec/compile/__import__."""
    root = Path(expr.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                if isinstance(fn, ast.Name):
                    name = fn.id
                elif isinstance(fn, ast.Attribute) and not (isinstance(fn.value, ast.Name) and fn.value.id == "re"):
                    name = fn.attr  # builtins.eval(...) and the like; re.compile is fine
                else:
                    name = ""
                assert name not in {"eval", "exec", "compile", "__import__"}, f"{path}:{node.lineno}"
