"""Static checks that keep the planner (training/plan/) a package of small rooms: no function over
60 lines, no private name imported from another package, and no copy of a rule that has its own
room (the loss's constants come through ``loss.registry``, the model family's through
``training.models``). Reads the source only: nothing is imported or run."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "training", "plan")
MAX_LINES = 60


def _modules():
    paths = sorted(glob.glob(os.path.join(PLAN, "*.py")))
    assert len(paths) > 1, f"{PLAN} is not a package of modules"
    return [(os.path.relpath(path, ROOT), ast.parse(open(path).read(), path)) for path in paths]


def test_no_planner_function_is_longer_than_60_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, f"split these (at most {MAX_LINES} lines each): {long}"


def test_the_planner_imports_no_private_name_from_another_package():
    private = [f"{path}:{node.lineno} {node.module}.{alias.name}"
               for path, tree in _modules() for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("training.plan")
               for alias in node.names if alias.name.startswith("_")]
    assert not private, f"use the public name (or make one): {private}"


def test_the_planner_reads_loss_and_family_rules_from_their_rooms():
    """Not ``loss.tail`` (its chunk sizes and exchange are ``loss.registry``'s answers; the fused
    path's chunk rows and buffers are ``loss.fused``'s own formulas), and no
    family matched by class name (``training.models.family`` says which layers and norms): no
    family or module-kind name compared, or passed to ``startswith`` / ``endswith``."""
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loss.") \
                    and node.module not in ("loss.registry", "loss.fused"):
                found.append(f"{path}:{node.lineno} imports {node.module}")
            found += [f"{path}:{node.lineno} matches {value!r}" for value in _matched_strings(node)
                      if any(name in value.lower() for name in _FAMILY_NAMES)]
    assert not found, found


_FAMILY_NAMES = ("decoderlayer", "gemma", "llama", "qwen", "norm")


def _matched_strings(node):
    """String constants ``node`` compares, or passes to ``startswith`` / ``endswith``."""
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
            node.func.attr in ("startswith", "endswith"):
        operands = node.args
    else:
        return []
    return [operand.value for operand in operands if isinstance(operand, ast.Constant) and isinstance(operand.value, str)]
