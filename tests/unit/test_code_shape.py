"""The shape of tasks/: every import at the top of its module, no import
circles, any module importable first.

A circle held apart by an import inside a function works until someone moves
that import; these checks make the layering a fact the suite keeps:
deploy.py -> tasks -> backends -> service data.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tasks"


def task_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(TASKS.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def tasks_imports(module: str, path: Path) -> set[str]:
    """The tasks modules `module` imports at its top level."""
    known = task_modules()
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from tasks import as_user` names a module; `from tasks.x import f` the module x
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def test_no_import_inside_a_function_or_class():
    inside = []
    for module, path in task_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inside += [f"{path.relative_to(REPO)}:{sub.lineno} {ast.unparse(sub)}"
                           for sub in ast.walk(node)
                           if isinstance(sub, (ast.Import, ast.ImportFrom))]
    assert inside == [], "imports belong at the top of the module:\n" + "\n".join(inside)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, trail + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_circle_and_a_straight_line():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_tasks_imports_form_no_circle():
    """A package imports its own submodules in __init__; a submodule that
    imports its package's __init__ back is the one circle allowed."""
    graph = {module: tasks_imports(module, path) for module, path in task_modules().items()}
    for module in graph:
        graph[module] = {dep for dep in graph[module] if not module.startswith(dep + ".")}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# What the route's tasks build on the backends and the service data; a backend
# that imports one of these again closes the circle the split removed.
ABOVE_BACKENDS = {"tasks.services", "tasks.restarts", "tasks.manifest", "tasks.server",
                  "tasks.proxy", "tasks.verify", "tasks.probes"}


def test_layers_point_one_way():
    """deploy.py -> tasks -> backends -> the service data (tasks/service_spec.py)."""
    graph = {module: tasks_imports(module, path) for module, path in task_modules().items()}
    assert reachable(graph, "tasks.service_spec") == set(), "the service data imports no task"
    for module in graph:
        if module.startswith("tasks.backends"):
            assert not reachable(graph, module) & ABOVE_BACKENDS, (
                f"{module} reaches {sorted(reachable(graph, module) & ABOVE_BACKENDS)}")


IMPORT_EACH_FIRST = """
import importlib, json, sys
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "tasks" or m.startswith("tasks.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:  # the message names the circle
        failures[name] = f"{type(e).__name__}: {e}"
print(json.dumps(failures))
"""


def test_every_tasks_module_imports_first():
    """Each module imported first into a fresh `tasks` package (one interpreter:
    pyinfra stays loaded, tasks/ is forgotten before each): what `python -c
    "import tasks.x"` does, for every x, in under a second of CPU."""
    order = json.dumps(list(task_modules()))
    out = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST, order],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {}, out.stdout
