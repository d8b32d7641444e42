"""The layers run one way: the import graph between the top-level packages has no cycle,
the Flower apps never import the launcher, and the configuration imports nothing of ours."""

import ast
from pathlib import Path

from launch.superlink import SOURCE_ROOT

PACKAGES = ("experiment", "models", "attacks", "strategies", "client", "server", "launch")
# bottom to top: a package may import only packages to its left
LAYERS = {"experiment": 0, "models": 1, "attacks": 1, "strategies": 2, "client": 3, "server": 3, "launch": 4}


def _imports(path: Path) -> set[str]:
    """Top-level project packages imported anywhere in the file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


def _graph() -> dict[str, set[str]]:
    graph = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (SOURCE_ROOT / package).rglob("*.py"):
            graph[package] |= _imports(path) - {package}
    return graph


def test_package_imports_follow_the_layers_and_form_no_cycle():
    graph = _graph()
    for package, deps in graph.items():
        for dep in deps:
            assert LAYERS[dep] < LAYERS[package], f"{package} imports {dep}"
    # (layers strictly decreasing along every edge: no cycle is possible; check it anyway)
    seen, stack = set(), []

    def visit(node: str) -> None:
        assert node not in stack, f"cycle: {' -> '.join(stack + [node])}"
        if node in seen:
            return
        stack.append(node)
        for dep in graph[node]:
            visit(dep)
        stack.pop()
        seen.add(node)

    for package in PACKAGES:
        visit(package)


def test_apps_never_import_the_launcher_and_config_imports_nothing_of_ours():
    graph = _graph()
    assert all("launch" not in graph[p] for p in PACKAGES if p != "launch")
    assert _imports(SOURCE_ROOT / "experiment" / "config.py") == set()


def test_every_torch_load_says_weights_only():
    """A checkpoint is untrusted input: only tensors may be unpickled, whatever
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says (torch's default alone follows that variable)."""
    import re

    for folder in (*PACKAGES, "tests", "benchmarks", "scripts", "docker"):
        for path in (SOURCE_ROOT / folder).rglob("*.py"):
            for call in re.findall(r"torch\.load\([^\n]*", path.read_text()):
                assert "weights_only=True" in call, f"{path}: {call}"


def test_only_the_run_directory_type_knows_its_file_names():
    """server/results.py (RunDir, the recorders) owns the run directory's layout: no other code
    spells one of its file names (tests may: they check the layout from outside)."""
    import re

    names = re.compile(r"""["'](summary\.json|config\.json|rounds\.csv|aux\.npy|initial\.pt|final\.pt|plot\.png|"""
                       r"""defended|checkpoints|\.flain-run)["']""")
    owner = SOURCE_ROOT / "server" / "results.py"
    for folder in (*PACKAGES, "benchmarks", "scripts", "docker"):
        for path in (SOURCE_ROOT / folder).rglob("*.py"):
            if path != owner:
                assert not names.findall(path.read_text()), f"{path}: {names.findall(path.read_text())}"
