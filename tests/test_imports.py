"""The package's import graph: no cycles, and the CLI at its edge (no library module imports it)."""
import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"surelock_fx": "surelock_fx", "surelock_fx.passes": "passes", "surelock_fx.models": "models"}
CLI = "surelock_fx.cli"


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every .py file of the installed package ([tool.setuptools.package-dir])."""
    modules = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in (ROOT / directory).rglob("*.py"):
            parts = path.relative_to(ROOT / directory).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that the file imports anywhere (module level or in a function), parent packages aside."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            base = ".".join(filter(None, (base, node.module)))
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {t for t in targets if t in modules and t != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def in_cli(module: str) -> bool:
    """Whether the module is the CLI package or one of its modules."""
    return module == CLI or module.startswith(CLI + ".")


def test_importing_the_package_leaves_the_cli_out():
    code = "import sys, surelock_fx; print(*sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert not [module for module in result.stdout.split() if in_cli(module)]


def test_the_import_graph_has_no_cycle():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as err:  # err.args[1] lists each module before the one that imports it
        raise AssertionError(f"import cycle (A -> B: A imports B): {' -> '.join(reversed(err.args[1]))}") from None


def test_no_library_module_imports_the_cli():
    offenders = {name: sorted(filter(in_cli, imports)) for name, imports in import_graph().items()
                 if not in_cli(name) and any(map(in_cli, imports))}
    assert not offenders, f"library modules import the CLI: {offenders}"
