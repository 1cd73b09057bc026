"""A multi grader's `calculate_output`: an arithmetic formula over its graders' scores, evaluated
from its syntax tree (never `eval`): numbers, the graders' names, + - * / ^ (or **) and unary
minus, parentheses, and the functions min, max, abs, floor, ceil, exp, sqrt, log."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping

FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
    "sqrt": math.sqrt, "log": math.log,
}
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
MAX_LENGTH = 1000


class FormulaError(ValueError):
    """A formula that cannot be parsed, or names something it may not."""


def parse(formula: str, names: set[str]) -> ast.Expression:
    """The formula's tree, checked: FormulaError naming the first thing that is not allowed."""
    if len(formula) > MAX_LENGTH:
        raise FormulaError(f"the formula is {len(formula)} characters, over the {MAX_LENGTH} allowed")
    try:
        # "^" is a power, as in OpenAI's formulas, binding as tightly as "**" (Python's "^" is a
        # bitwise xor, below + and -); a formula holds no strings, so the swap cannot hit one.
        tree = ast.parse(formula.strip().replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"cannot parse {formula!r}: {exc.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load, ast.operator, ast.unaryop)):
            if isinstance(node, ast.operator) and type(node) not in _BINARY:
                raise FormulaError(f"the operator {type(node).__name__} is not allowed (+ - * / ^ are)")
            if isinstance(node, ast.unaryop) and not isinstance(node, (ast.USub, ast.UAdd)):
                raise FormulaError(f"the operator {type(node).__name__} is not allowed")
            continue
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise FormulaError(f"{node.value!r} is not a number")
        elif isinstance(node, ast.Name):
            if node.id not in names and node.id not in FUNCTIONS:
                known = ", ".join(sorted(names)) or "none"
                raise FormulaError(f"{node.id!r} is not one of the graders ({known})")
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
                raise FormulaError(f"only the functions {', '.join(FUNCTIONS)} may be called")
            if not node.args:
                raise FormulaError(f"{node.func.id}() needs an argument")
        elif not isinstance(node, (ast.BinOp, ast.UnaryOp)):
            raise FormulaError(f"{type(node).__name__} is not allowed in a formula")
    return tree


def evaluate(tree: ast.Expression, scores: Mapping[str, float]) -> float:
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)  # type: ignore[arg-type]  # parse() let only numbers through
        if isinstance(node, ast.Name):
            return float(scores[node.id])
        if isinstance(node, ast.UnaryOp):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise FormulaError("an exponent over 1000")
            return float(_BINARY[type(node.op)](left, right))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        return float(FUNCTIONS[node.func.id](*(value(a) for a in node.args)))

    try:
        return value(tree.body)
    except (ZeroDivisionError, OverflowError, ValueError) as exc:
        raise FormulaError(f"{type(exc).__name__}: {exc}") from None
