"""A loss kind is one entry of ``loss.registry.LOSSES``: no code outside ``loss/`` (and the tests)
decides anything by comparing with a kind's name. What a caller needs to know about a kind is a
field or method of its :class:`loss.registry.Divergence` (static check, AST only: fast)."""

import ast
import os

from loss.registry import LOSSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE_LOSS = ("launch", "training", "eval", "benchmarks", "data", "model_parallel", "core")
"""Every package above or beside ``loss/`` (the static test below checks that none is missing)."""


def _strings(node):
    """The string constants ``node`` is, or holds as a tuple, list or set display."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [value for element in node.elts for value in _strings(element)]
    return []


def _kind_comparisons(path, names):
    """``(line, name)`` for each loss-kind name in ``names`` that ``path`` compares with (``==``,
    ``!=``, ``in``, ``not in``, ``is``, either side) or matches in a ``case``."""
    with open(path) as source:
        tree = ast.parse(source.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        for operand in operands:
            for value in _strings(operand):
                if value in names:
                    yield node.lineno, value


def _python_files():
    for package in OUTSIDE_LOSS:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            yield from (os.path.join(directory, name) for name in sorted(files) if name.endswith(".py"))


def test_no_loss_kind_name_is_compared_outside_loss():
    offenders = [f"{os.path.relpath(path, ROOT)}:{line} {name!r}" for path in _python_files()
                 for line, name in _kind_comparisons(path, set(LOSSES))]
    assert not offenders, ("loss-kind names compared outside loss/ (ask loss.registry.LOSSES[kind] instead): " +
                           ", ".join(offenders))


def test_every_package_beside_loss_is_checked():
    packages = {name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name, "__init__.py"))}
    assert packages - {"loss", "tests"} <= set(OUTSIDE_LOSS)


def test_the_static_check_sees_kind_comparisons_only(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("\n".join([
        'if cfg.kind == "tail": pass',  # 1: flagged
        'ok = kind in ("kl", "reverse_kl")',  # 2: flagged twice
        'ok = "ce" != kind',  # 3: flagged
        'ok = fmt in {"text", "sft"}',  # 4: data formats, not loss kinds
        'overrides = ["loss.kind=tail"]; default = "tail"',  # 5: no comparison
        'table = {"kl": 1}["kl"]',  # 6: a subscript, not a comparison
        'match kind:\n    case "kl": pass',  # 8: flagged
    ]) + "\n")
    assert list(_kind_comparisons(str(source), set(LOSSES))) == [(1, "tail"), (2, "kl"), (2, "reverse_kl"), (3, "ce"),
                                                                  (8, "kl")]
