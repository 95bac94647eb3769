"""The architecture as folders: each top-level package imports only what DESIGN.md's
"Layout and import names" table allows, and the README's Layout table, pyproject's
package-dir mapping and the folders agree.

Imports are read with `ast` from every module (function-level and TYPE_CHECKING
imports included, relative imports resolved), so a lazy import counts too.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB = frozenset(sys.stdlib_module_names)

# package -> (folder, gradserve packages it may import, other top-level modules it may
# import; None = any outside gradserve). A package may always import itself.
RULES = {
    # numba: the optional kernel provider (engine/kernels.py imports it only when it imports)
    "engine": ("engine", set(), {"numpy", "numba"} | STDLIB),
    "v1": ("proto/gradserve/v1", set(), {"google", "grpc", "numpy"} | STDLIB),
    "server": ("server", {"engine", "v1"}, None),
    "client": ("client", {"v1"}, None),
    "cli": ("cli", {"server", "client", "v1"}, None),
}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the module at `path`, whose
    package is `package` (e.g. gradserve.server)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            if module in ("gradserve", "gradserve.v1") or node.level and not node.module:
                # `from gradserve import cli`, `from . import ops`: the names are modules
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(name: str) -> list[str]:
    folder, allowed_packages, allowed_others = RULES[name]
    allowed = allowed_packages | {name}
    wrong = []
    for path in sorted((REPO / folder).rglob("*.py")):
        subpackage = path.parent.relative_to(REPO / folder).parts
        package = ".".join(("gradserve", name, *subpackage))
        for line, module in imported_modules(path, package):
            parts = module.split(".")
            if parts[0] == "gradserve":
                ok = len(parts) > 1 and parts[1] in allowed
            else:
                ok = allowed_others is None or parts[0] in allowed_others
            if not ok:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return wrong


@pytest.mark.parametrize("name", list(RULES))
def test_imports_follow_the_layout(name):
    folder, packages, others = RULES[name]
    may = ", ".join(sorted(packages)) or "no other gradserve package"
    assert not violations(name), (f"gradserve.{name} may import {may}"
                                  + ("" if others is None else " and numpy/protobuf/grpc as "
                                     "listed, besides the standard library")
                                  + ":\n" + "\n".join(violations(name)))


@pytest.mark.parametrize("name", [name for name in RULES if name != "cli"])
def test_libraries_parse_no_arguments_print_or_exit(name):
    """Only the command (gradserve.cli) parses arguments, prints and exits."""
    found = []
    for path in sorted((REPO / RULES[name][0]).rglob("*.py")):
        if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
            continue  # generated
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            what = None
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in ("print", "exit", "quit"):
                    what = f"{func.id}()"
                elif isinstance(func, ast.Attribute) and func.attr == "exit" and \
                        getattr(func.value, "id", None) in ("sys", "os"):
                    what = f"{func.value.id}.exit()"
            elif isinstance(node, ast.Name) and node.id == "SystemExit":
                what = "SystemExit"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "argparse" in names:
                    what = "argparse"
            if what:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {what}")
    assert not found, f"gradserve.{name} is a library:\n" + "\n".join(found)


def test_the_checker_sees_lazy_relative_and_dynamic_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from ..engine import ir\n"
                      "def f():\n"
                      "    from gradserve import server\n"
                      "    import gradserve.client.builder\n"
                      "    from . import limits\n"
                      "    importlib.import_module('gradserve.cli')\n")
    assert [m for _, m in imported_modules(module, "gradserve.server")] == [
        "gradserve.engine", "gradserve.server", "gradserve.client.builder",
        "gradserve.server.limits", "gradserve.cli"]


def test_readme_layout_pyproject_and_folders_agree():
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = mapping["package-dir"]
    # every folder with an __init__.py below a mapped folder is a listed package (or an
    # installed wheel lacks it), and nothing else is listed
    packages = set(package_dirs)
    for name, folder in package_dirs.items():
        packages |= {".".join((name, *init.parent.relative_to(REPO / folder).parts))
                     for init in (REPO / folder).rglob("*/__init__.py")}
    assert set(mapping["packages"]) == packages
    assert {f"gradserve.{name}": folder for name, (folder, _, _) in RULES.items()} == package_dirs
    for folder in package_dirs.values():
        assert (REPO / folder / "__init__.py").is_file(), folder

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`|]+)/` \| (?:`([^`]+)`)? *\|", layout, re.M)
    table = {f"{imp}": folder for folder, imp in rows if imp}
    assert table == {name: folder for name, folder in package_dirs.items()}, layout
    top_level = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")
                 and any(p.rglob("*.py"))} - {"build", "gradserve.egg-info"}
    listed = {folder.split("/")[0] for folder, _ in rows}
    assert top_level <= listed, f"folders missing from README's Layout: {top_level - listed}"


# --- the tests themselves ----------------------------------------------------------------

TEST_PARTS = {"engine", "wire", "server", "client", "cli", "deploy"}


def test_tests_live_in_folders_by_part():
    """Each test module sits in the folder of the part it tests; shared helpers live in
    tests/support/ only."""
    tests = REPO / "tests"
    for path in tests.rglob("test_*.py"):
        folder = path.parent.relative_to(tests)
        assert path.name == "test_layout.py" or str(folder) in TEST_PARTS, (
            f"{path.relative_to(REPO)}: test modules go in tests/<part>/ "
            f"({', '.join(sorted(TEST_PARTS))})")
    for path in tests.rglob("*.py"):
        if path.parent == tests or path.parent.name in TEST_PARTS:
            assert path.name.startswith("test_") or path.name == "conftest.py", (
                f"{path.relative_to(REPO)}: shared helpers go in tests/support/")


def test_test_module_names_are_unique():
    """pytest imports test modules by their file name (the folders are not packages): two
    of one name in different folders stop the whole run at collection."""
    seen: dict[str, Path] = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        assert path.name not in seen, (
            f"{path.relative_to(REPO)} and {seen[path.name].relative_to(REPO)}: "
            "one name for two test modules")
        seen[path.name] = path


def test_benchmarks_import_test_helpers_from_support():
    """bench/ scripts put tests/ on sys.path and take its shared helpers as support.X:
    a helper imported by its bare name (from before tests/support/) breaks the script."""
    helpers = {p.stem for p in (REPO / "tests" / "support").glob("*.py")}
    for path in sorted((REPO / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and not node.level else [])
            for name in names:
                assert name.split(".")[0] not in helpers, (
                    f"{path.relative_to(REPO)}: import {name} as support.{name}")


def test_no_test_module_imports_another():
    """Test modules share helpers through tests/support/, never by importing each other."""
    tests = REPO / "tests"
    modules = {p.stem for p in tests.rglob("test_*.py")} | {"conftest"}
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in modules, (
                    f"{path.relative_to(REPO)}:{node.lineno} imports {name}: move what it "
                    "needs to tests/support/")


RULE_CALLS = ("eval", "jvp", "vjp")


def sweep_loops(path: Path, root: Path = REPO) -> list[str]:
    """Loops in the module at `path` that run ops over a list of steps: a for loop over
    something named like steps (steps, chunk, self._steps, range(len(steps) ...)) whose
    body calls a step's eval, jvp or vjp."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.For):
            continue
        names = {n.id for n in ast.walk(node.iter) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(node.iter) if isinstance(n, ast.Attribute)}
        if not any("step" in n or "chunk" in n for n in names):
            continue
        calls = {n.func.attr for n in ast.walk(node) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute)}
        if calls & set(RULE_CALLS):
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_one_interpreter_each_sweep_is_written_once():
    """engine/sweeps.py holds the only loops that run ops over the steps; second order
    (forward-over-reverse) is a hook of its reverse sweep, as a trace is, and imports none
    of its private helpers."""
    engine = REPO / "engine"
    loops = {path.name: sweep_loops(path) for path in sorted(engine.rglob("*.py"))}
    assert loops.pop("sweeps.py"), "the checker finds no sweep loop in sweeps.py itself"
    assert not [loop for found in loops.values() for loop in found], loops
    private = []
    for path in sorted(engine.rglob("*.py")):
        if path.name == "sweeps.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("sweeps"):
                private += [f"{path.relative_to(REPO)}:{node.lineno} {a.name}"
                            for a in node.names if a.name.startswith("_")]
    assert not private, private
    second = (engine / "second.py").read_text(encoding="utf-8")
    assert "reverse_sweep(" in second


def test_the_sweep_loop_checker_sees_a_copied_loop(tmp_path):
    module = tmp_path / "copy.py"
    module.write_text("def run(steps, vals):\n"
                      "    for j in range(len(steps) - 1, -1, -1):\n"
                      "        st = steps[j]\n"
                      "        st.vjp(0, None, (), None)\n"
                      "    for st in steps:\n"
                      "        vals[st.out] = st.eval()\n"
                      "    for pos in (0, 1):\n"
                      "        steps[0].vjp(pos, None, (), None)\n")
    assert sweep_loops(module, tmp_path) == ["copy.py:2", "copy.py:5"]


def test_one_name_per_concept_one_value_per_name():
    """The engine and the wire may not import each other, so a concept both need is
    named and valued in each and checked here: the dtype names, the floating ones, and
    the rank limits (a value's rank, leaving room for a Jacobian block of two values,
    is not NumPy's array rank limit, and the two have different names)."""
    from gradserve import engine
    from gradserve.client import _remote, onnx
    from gradserve.v1 import codec, tensor_wire

    assert tuple(codec.WIRE_DTYPES) == engine.DTYPES
    assert onnx.WIRE_DTYPES is codec.WIRE_DTYPES
    assert _remote.FLOAT_DTYPES == engine.FLOAT_DTYPES
    assert 2 * engine.MAX_RANK <= tensor_wire.NUMPY_MAX_RANK
    assert not hasattr(tensor_wire, "MAX_RANK")
    # the function engine.trace does not hide a module of that name
    assert callable(engine.trace) and not (REPO / "engine" / "trace.py").exists()
