"""The imports point one way: no circle inside fisao/, no Prefect or MLflow in it, and each package
(fisao, tasks, runner, flows, cli) imports only those below it; flows/ holds flows only."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names, wherever the statement sits (function bodies
    and `if TYPE_CHECKING:` included): `from a.b import c` names both a.b and a.b.c."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _library() -> dict[str, set[str]]:
    """fisao's modules, each with the modules it imports."""
    graph = {}
    for path in sorted((ROOT / "fisao").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        graph[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = _imports(path)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the graph's own modules (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m] & graph.keys()):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "os"}, "b": {"c"}, "c": set()}) is None


def test_library_has_no_import_circle():
    assert _cycle(_library()) is None, " -> ".join(_cycle(_library()))


def test_library_never_imports_prefect_or_mlflow():
    bad = {m: sorted(n for n in names if n.split(".")[0] in ("prefect", "mlflow"))
           for m, names in _library().items()}
    assert not {m: n for m, n in bad.items() if n}


def _modules(package: str) -> dict[str, set[str]]:
    """The modules of a top-level package of the project, each with the modules it imports."""
    return {path.relative_to(ROOT).as_posix(): _imports(path) for path in sorted((ROOT / package).rglob("*.py"))}


# The project's packages, lowest first: each imports only those before it. fisao/ is the library;
# tasks/ wrap it; runner/ is how a campaign's process lives (its Prefect API server, how it stops);
# flows/ wire tasks; cli/ sits on top (it starts flows, reads MLflow, prints).
LAYERS = ("fisao", "tasks", "runner", "flows", "cli")


def test_the_installed_packages_are_the_layers():
    """A new top-level package gets a place in LAYERS (and its import rule) before it is installed."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.removesuffix("*") for p in include) == sorted(LAYERS)


def test_each_layer_imports_only_the_layers_below_it():
    bad = {path: sorted(n for n in names if n.split(".")[0] in LAYERS[i + 1:])
           for i, package in enumerate(LAYERS) for path, names in _modules(package).items()}
    assert not {path: n for path, n in bad.items() if n}


def _defines_a_flow(path: Path) -> bool:
    """Whether a function in `path` is decorated with Prefect's `flow` (bare or called)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                if isinstance(target, ast.Name) and target.id == "flow":
                    return True
    return False


def test_flows_holds_flows_only():
    """Every module of flows/ defines a flow: what a flow's process needs around it (its API server,
    its signal handling) lives in runner/, the rest in tasks/ or fisao/."""
    not_flows = [path.name for path in sorted((ROOT / "flows").glob("*.py"))
                 if path.name != "__init__.py" and not _defines_a_flow(path)]
    assert not not_flows


def test_the_fisao_command_is_cli_main_and_loads_without_prefect_or_mlflow():
    """The console script runs cli.main:entry (main, then out without the interpreter's teardown),
    and building its parser (what `fisao world build` or `fisao eval chair` needs before running)
    imports neither Prefect nor MLflow: they start fast."""
    import subprocess
    import sys
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["fisao"] == "cli.main:entry"
    code = ("import sys; from cli.main import build_parser, main; build_parser().parse_args(['world', 'build']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_flows_load_without_torch_or_transformers():
    """Importing the flows (what `fisao run` does before its server starts, and all a fully cached
    campaign needs) leaves torch and transformers to the stages that run: the tasks import the
    library's stages where they call them. Measured: 7.0 s to import flows.campaign before, 2.8 s after."""
    import subprocess
    import sys

    code = ("import sys; import flows.campaign, flows.sweep, flows.evaluate, flows.world; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
