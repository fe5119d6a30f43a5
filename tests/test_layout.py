"""The package's layout: the flow runs one way (core <- stages <- entry points), no import cycles,
every module says what it owns, and the built wheel holds every subpackage."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "negagent"
# Stages sit on the core and never import one another; sweep and export are stage-level too.
STAGES = ("negagent.collection", "negagent.training", "negagent.evaluation", "negagent.report",
          "negagent.sweep", "negagent.export")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """negagent modules `path` imports anywhere (module level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _stage(name: str) -> str | None:
    return next((s for s in STAGES if name == s or name.startswith(s + ".")), None)


def test_no_import_cycles():
    graph = _graph()
    # A package __init__ that re-exports its own submodules is not a cycle with them.
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d == _stage(m))} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_core_never_imports_a_stage_and_stages_never_import_each_other():
    wrong = []
    for module, deps in _graph().items():
        mine = _stage(module)
        for dep in deps:
            theirs = _stage(dep)
            if theirs is not None and theirs != mine:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, wrong


def test_every_module_has_a_docstring_and_every_stage_says_what_it_owns():
    missing = [name for name, path in _modules().items()
               if not ast.get_docstring(ast.parse(path.read_text())) and path.name != "__main__.py"]
    assert not missing, f"modules without a docstring: {missing}"
    for stage in ("collection", "training", "evaluation", "report"):
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert "import" in doc, f"negagent/{stage}/__init__.py must say what the stage may import"


def test_readme_layout_lists_every_module():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 4)]
    missing = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
               if path.name not in ("__init__.py", "__main__.py") and path.name not in layout]
    assert not missing, f"README's layout does not list: {missing}"


def test_wheel_holds_every_subpackage(tmp_path):
    # Built from a copy of the tracked tree: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        pytest.fail(f"pip wheel failed: {built.stderr[-2000:]}")
    wheel = next(tmp_path.glob("negagent-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(REPO).as_posix() for p in REPO.glob("negagent/**/__init__.py")}
    packages |= {"hydra_plugins/negagent_launcher"}
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"the wheel lacks {missing}"
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    assert any("transformers" in r for r in requires) and any("extra == \"vllm\"" in r for r in requires)
