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
    "engine": ("engine", set(), {"numpy"} | STDLIB),
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
    top = {p for p in mapping["packages"] if p.count(".") == 1}
    assert top == set(package_dirs)
    # a sub-package (gradserve.client.onnx) is listed too, or a wheel would leave it out
    listed = set()
    for name, folder in package_dirs.items():
        listed |= {".".join([name, *init.parent.relative_to(REPO / folder).parts])
                   for init in (REPO / folder).rglob("__init__.py")}
    assert set(mapping["packages"]) == listed
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
