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
PACKAGE = "label_studio_sam2"
PRODUCT = (PACKAGE,)
FIRST_PARTY = {PACKAGE, "tests", "bench", "tools", "devkit"}
# the layers, lowest first: each imports only the ones before it
LAYERS = ("engine", "service", "labelstudio", "cli")
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
    names = modules(PACKAGE, "bench", "devkit") + ["label_studio_sam2.__main__"]
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


def test_python_m_starts():
    out = subprocess.run(
        [PY, "-m", "label_studio_sam2", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in ("serve", "make-test-model", "convert", "preannotate", "warm"):
        assert command in out.stdout


def test_no_function_local_first_party_imports():
    """Imports of the project's own modules sit at the top of the file (a function-local one
    would hide an import circle). The exceptions are the entry points that must not import torch
    before they need it: the WSGI one (gunicorn's master) and the CLI's (`--help` answers at once;
    its other commands' modules come through `importlib`, by name: label_studio_sam2.cli.parsers.lazy)."""
    cli = REPO / PACKAGE / "cli" / "main.py"
    allowed = {
        (REPO / PACKAGE / "labelstudio" / "wsgi.py", "label_studio_sam2.labelstudio.app"),
        (cli, "label_studio_sam2.labelstudio.app"),
        (cli, "label_studio_sam2.engine.models"),
        (cli, "label_studio_sam2.engine.convert"),
    }
    local = [
        f"{path.relative_to(REPO)}: {name}"
        for path in py_files(*PRODUCT)
        for name, in_function in imports(path)
        if in_function and name.split(".")[0] in PRODUCT and (path, name) not in allowed
    ]
    assert not local, local


WEB = ("flask", "werkzeug", "label_studio_sdk")


def layer_edges() -> list[str]:
    """The imports against the direction."""
    wrong = []
    package = REPO / PACKAGE
    for path in py_files(PACKAGE):
        rel = path.relative_to(package)
        layer = rel.parts[0] if len(rel.parts) > 1 else None  # None: the package's own __init__/__main__
        for name, _ in imports(path):
            parts = name.split(".")
            top = parts[0]
            target = parts[1] if top == PACKAGE and len(parts) > 1 else None
            if layer == "engine" and (top in WEB or target in ("service", "labelstudio", "cli")):
                wrong.append(f"{rel} imports {name}")
            if layer == "engine" and top in ("pydantic", "pydantic_settings"):
                wrong.append(f"{rel} imports {name}: the engine is given its options, it reads no settings")
            if layer in ("service", "labelstudio", "cli") and top == "torch":
                wrong.append(f"{rel} imports {name}: only the engine imports torch")
            if layer == "service" and (top in WEB or target in ("labelstudio", "cli")):
                wrong.append(f"{rel} imports {name}: the service is tool-neutral")
            if layer == "labelstudio" and target == "cli":
                wrong.append(f"{rel} imports {name}")
            if layer == "cli" and top in WEB and name != "werkzeug.serving":
                wrong.append(f"{rel} imports {name}: the CLI starts the adapter, it does not speak HTTP")
    return wrong


def test_imports_point_one_way():
    """engine <- service <- labelstudio <- cli: Flask and label_studio_sdk only in the adapter,
    nothing of the adapter in the service, torch only in the engine, the settings never in the
    engine."""
    wrong = layer_edges()
    for path in py_files(PACKAGE, "tools", "bench", "devkit", "deploy"):
        wrong += [
            f"{path.relative_to(REPO)} imports {n}" for n, _ in imports(path) if n.split(".")[0] == "tests"
        ]
    assert not wrong, wrong


def test_only_the_package_is_installed():
    """Nothing installs a top-level `sam2` (Meta's own package) or `backend`."""
    assert not (REPO / "sam2").exists() and not (REPO / "backend").exists()
    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == [PACKAGE, f"{PACKAGE}.*"], found


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
