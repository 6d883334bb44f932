"""The `${...}` expressions of recipes: names, numbers, arithmetic and a few functions, never `eval`.

`${model.KEY}`, `${base.KEY}`, `${inputs.NAME}`, `${steps.ID.KEY}` name values of the run's scope; arithmetic and
min/max/int/round/float combine them. A string that is one `${...}` takes the expression's type; `${...}` inside a
longer string is formatted into it. Results stay within what a recipe value can be (numbers below 1e18, finite, no
arithmetic on text or lists), and so do the operands that make a computation long (a power's exponent, the digits
`round` rounds to), so a typo cannot make the runner compute for hours or fill the memory.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from .schema import RecipeError, Unknown


_EXPRESSION = re.compile(r"\$\{([^}]*)\}")
_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "int": int, "round": round, "float": float}
MAX_MAGNITUDE = 10**18
"""The largest number an expression may reach: recipe values are lengths, counts, factors and token budgets (a
trillion tokens is 1e12); `9**9**9` would otherwise compute a number of 370 million digits for minutes."""
MAX_DIGITS = round(math.log10(MAX_MAGNITUDE))
_LIMIT = f"1e{MAX_DIGITS}"
MAX_TEXT = 10_000
"""The longest text an expression may make (`+` joins texts)."""


class Unresolved(RecipeError):
    """A value needs something not known yet (a dry run before the step that produces it)."""


def evaluate_expression(text: str, scope: Mapping[str, Any]) -> Any:
    """Evaluate `model.max_position_embeddings * 4` and the like: names, attributes, numbers, + - * / // % **,
    and min/max/int/round/float. Nothing else (no calls of other functions, no subscripts) is accepted."""
    source, text = text, text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"  # for the messages
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError:
        raise RecipeError(f"${{{text}}} is not an expression; write e.g. ${{base.max_position_embeddings * 4}}.") from None
    except (RecursionError, MemoryError):
        raise RecipeError(f"${{{text}}} is nested too deeply; split it into inputs.") from None

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return _bounded(node.value, text)
        if isinstance(node, (ast.Name, ast.Attribute)):
            return _lookup(_dotted(node), scope, text)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            _check_operands(node.op, [left, right], text)
            return _bounded(_OPERATORS[type(node.op)](left, right), text)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            operand = walk(node.operand)
            _check_operands(node.op, [operand], text)
            return _OPERATORS[type(node.op)](operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            if node.keywords:
                raise RecipeError(f"${{{text}}}: {node.func.id}() takes values, not keywords.")
            arguments = [walk(argument) for argument in node.args]
            _check_arguments(node.func.id, arguments, text)
            return _bounded(_FUNCTIONS[node.func.id](*arguments), text)
        raise RecipeError(f"${{{text}}}: only names, numbers, arithmetic and {', '.join(_FUNCTIONS)} are allowed.")

    try:
        return walk(tree)
    except ZeroDivisionError:
        raise RecipeError(f"${{{text}}} divides by zero; change the divisor (is a config value it reads 0?).") from None
    except (ArithmeticError, TypeError, ValueError) as e:  # int("x"), min() of nothing, round of a string...
        raise RecipeError(f"${{{text}}} cannot be computed: {e}; write e.g. ${{base.max_position_embeddings * 4}}."
                          ) from None
    except RecursionError:
        raise RecipeError(f"${{{text}}} is nested too deeply; split it into inputs.") from None


def _check_operands(op: ast.AST, operands: list[Any], text: str) -> None:
    """Arithmetic is on numbers (and `+` joins two texts): `"a" * 10**12` or a list times a number would fill memory."""
    if isinstance(op, ast.Add) and all(isinstance(v, str) for v in operands):
        return
    for value in operands:
        if not isinstance(value, (int, float)):
            raise RecipeError(f"${{{text}}}: arithmetic needs numbers, and {value!r} is not one.")
    if isinstance(op, ast.Pow):
        base, exponent = operands
        if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
            raise RecipeError(f"${{{text}}}: {base} ** {exponent} has about {exponent * math.log10(abs(base)):,.0f} "
                              f"digits; a recipe value is below {_LIMIT} (a length, a count, a factor).")


def _check_arguments(function: str, arguments: list[Any], text: str) -> None:
    """`round(x, n)` with n far below 0 computes 10**-n first (`round(5, -10**8)` takes 15 s, `-10**18` forever):
    a recipe value has at most MAX_DIGITS digits, so rounding to more on either side of the point means nothing."""
    if function == "round" and len(arguments) == 2:
        digits = arguments[1]
        if isinstance(digits, int) and not isinstance(digits, bool) and abs(digits) > MAX_DIGITS:
            raise RecipeError(f"${{{text}}}: round to {digits} digits is beyond what a recipe value holds (below "
                              f"{_LIMIT}); give round(x, n) with n between -{MAX_DIGITS} and {MAX_DIGITS}.")


def _bounded(value: Any, text: str) -> Any:
    """`value`, unless it is a number beyond MAX_MAGNITUDE (or not finite, or complex), or a text over MAX_TEXT."""
    if isinstance(value, complex):
        raise RecipeError(f"${{{text}}} is the complex number {value}; a recipe value is a real number.")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"${{{text}}} is {value}, not a finite number; check what it divides or multiplies.")
    if isinstance(value, (int, float)) and abs(value) > MAX_MAGNITUDE:
        raise RecipeError(f"${{{text}}} is about 1e{math.floor(math.log10(abs(value)))}; a recipe value is below "
                          f"{_LIMIT} (a length, a count, a factor).")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise RecipeError(f"${{{text}}} is a text of {len(value)} characters; a recipe value is at most {MAX_TEXT}.")
    return value


def _dotted(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + [node.attr]
    raise RecipeError("only dotted names (model.hidden_size) can be looked up.")


def _lookup(path: list[str], scope: Mapping[str, Any], text: str) -> Any:
    value: Any = scope
    for depth, part in enumerate(path):
        if isinstance(value, Unknown):
            raise Unresolved(f"${{{text}}} depends on {value.why}")
        if not isinstance(value, Mapping) or part not in value:
            where = ".".join(path[:depth]) or "the scope"
            options = ", ".join(sorted(map(str, value))) if isinstance(value, Mapping) else "nothing"
            raise RecipeError(f"${{{text}}}: {where} has no {part!r}; it has {options}.")
        value = value[part]
    if isinstance(value, Unknown):
        raise Unresolved(f"${{{text}}} depends on {value.why}")
    return value


def resolve(value: Any, scope: Mapping[str, Any]) -> Any:
    """Every `${...}` in a (nested) value replaced by its value."""
    if isinstance(value, dict):
        return {k: resolve(v, scope) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, scope) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _EXPRESSION.fullmatch(value.strip())
    if whole:
        return evaluate_expression(whole.group(1), scope)
    return _EXPRESSION.sub(lambda m: str(evaluate_expression(m.group(1), scope)), value)
