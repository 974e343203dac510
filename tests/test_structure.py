"""The code's structure: every module imports on its own (no import circles), imports point one
way, and every package the code imports is declared."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
PRODUCT = ("backend", "sam2")
FIRST_PARTY = {"backend", "sam2", "tests", "bench", "tools", "devkit"}
# runs inside Label Studio's own virtualenv (.venv-ls), not ours
OTHER_VENV = {REPO / "devkit" / "ls_bootstrap.py"}


def modules(*folders: str) -> list[str]:
    out = []
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module name, inside a function) of every absolute import in a file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def py_files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((REPO / f).rglob("*.py"))]


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each first-party module is imported in a fresh child process where no other first-party
    module is loaded yet, so an import circle fails here whichever module a caller starts from.
    (The heavy third-party libraries are imported once, before the children fork.)"""
    names = modules("backend", "sam2", "bench", "devkit") + ["backend.__main__"]
    script = (
        "import os, sys, importlib\n"
        "import torch, transformers, flask, label_studio_sdk, cv2, av\n"
        "from transformers import Sam2Model, Sam2VideoModel\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except BaseException as e:\n"
        "            print(f'{name}: {type(e).__name__}: {e}', flush=True)\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    _, status = os.waitpid(pid, 0)\n"
        "    if status:\n"
        "        failed.append(name)\n"
        "print('FAILED', failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    out = subprocess.run([PY, "-c", script, *names], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


def test_python_m_backend_starts():
    out = subprocess.run(
        [PY, "-m", "backend", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in ("serve", "make-test-model", "convert", "preannotate", "warm"):
        assert command in out.stdout


def test_no_function_local_first_party_imports():
    """Imports of the project's own modules sit at the top of the file (a function-local one
    would hide an import circle). The exceptions are the entry points that must not import torch
    before they need it: the WSGI one (gunicorn's master) and the CLI's (`--help` answers at once;
    its other commands' modules come through `importlib`, by name: backend.cli_parsers.lazy)."""
    cli = REPO / "backend" / "cli.py"
    allowed = {
        (REPO / "backend" / "wsgi.py", "backend.app"),
        (cli, "backend.app"),
        (cli, "sam2.models"),
        (cli, "sam2.convert"),
    }
    local = [
        f"{path.relative_to(REPO)}: {name}"
        for path in py_files(*PRODUCT)
        for name, in_function in imports(path)
        if in_function and name.split(".")[0] in PRODUCT and (path, name) not in allowed
    ]
    assert not local, local


def test_imports_point_one_way():
    wrong = []
    for path in py_files("backend"):
        wrong += [
            f"{path.relative_to(REPO)} imports {n}" for n, _ in imports(path) if n.split(".")[0] == "torch"
        ]
    for path in py_files("sam2"):
        wrong += [
            f"{path.relative_to(REPO)} imports {n}"
            for n, _ in imports(path)
            if n.split(".")[0] in ("backend", "flask", "werkzeug", "label_studio_sdk")
        ]
    for path in py_files("backend", "sam2", "tools", "bench", "devkit", "deploy"):
        wrong += [
            f"{path.relative_to(REPO)} imports {n}" for n, _ in imports(path) if n.split(".")[0] == "tests"
        ]
    assert not wrong, wrong


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(_normalise(re.split(r"[<>=!~\[; ]", line)[0]))
    return names


def _distributions(paths: list[Path]) -> dict[str, set[str]]:
    """distribution -> files importing it (third-party only; torch is installed by the Makefile
    and the Docker base image on purpose, see requirements.txt)."""
    dist_of = packages_distributions()
    used: dict[str, set[str]] = {}
    for path in paths:
        if path in OTHER_VENV:
            continue
        for name, _ in imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "torch":
                continue
            dists = dist_of.get(top)
            assert dists, f"{path.relative_to(REPO)} imports {top}, which no installed distribution provides"
            used.setdefault(_normalise(dists[0]), set()).add(str(path.relative_to(REPO)))
    return used


def test_every_imported_package_is_declared():
    runtime = _requirements(REPO / "requirements.txt")
    dev = _requirements(REPO / "requirements-dev.txt")
    project_toml = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    project = project_toml["dependencies"]
    pyproject = {_normalise(re.split(r"[<>=!~\[; ]", d)[0]) for d in project}
    assert runtime == pyproject, f"requirements.txt and pyproject.toml differ: {runtime ^ pyproject}"
    # opt-in runtimes (ENCODER_RUNTIME=openvino): a pip extra, imported only where chosen
    extras = {
        _normalise(re.split(r"[<>=!~\[; ]", d)[0])
        for deps in project_toml.get("optional-dependencies", {}).values()
        for d in deps
    }
    assert extras <= dev, f"the tests need every optional extra: {extras - dev} not in requirements-dev.txt"
    product = _distributions(py_files(*PRODUCT, "deploy"))
    missing = {d: sorted(f)[:3] for d, f in product.items() if d not in runtime | extras}
    assert not missing, f"imported by the product but not in requirements.txt/pyproject.toml: {missing}"
    rest = _distributions(py_files("tests", "tools", "bench", "devkit"))
    missing = {d: sorted(f)[:3] for d, f in rest.items() if d not in runtime | dev}
    assert not missing, f"imported by tests/tools/bench/devkit but not in requirements*.txt: {missing}"
