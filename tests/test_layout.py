"""The layout shows the architecture: the top of app/ holds only the Flower entry points, the wire,
the configuration and the CLI; every other module lives in the package of its role, and no module
imports another that imports it back (lazy imports inside functions included)."""

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"
TOP_LEVEL = {"__init__.py", "client_app.py", "server_app.py", "comm.py", "config.py", "cli.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each app module -> the app modules it imports anywhere in its source."""
    modules = {_module_name(p): p for p in APP.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # `from app.training import data` names a module
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t not in (name, "app")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a -> b -> ... -> a, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_top_of_app_holds_only_entry_points_wire_config_and_cli():
    extra = sorted(p.name for p in APP.glob("*.py") if p.name not in TOP_LEVEL)
    assert not extra, f"modules at the top of app/ that belong in a package of their role: {extra}"


def test_every_role_package_is_a_package():
    for package in ("aggregation", "deploy", "evaluation", "training", "node", "results"):
        assert (APP / package / "__init__.py").is_file(), f"app/{package}/ is not a package"


def test_no_module_imports_in_a_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    # The finder itself must be able to fail: the data <-> tiny circle this layout broke.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
