"""Every environment read of the package goes through Settings (label_studio_sam2/service/settings.py):
no other module of label_studio_sam2/ reads os.environ, os.getenv or their bytes twins. The engine
is given its options (precision, encoder runtime, directories, hub access) by the service; the CLI
and the logging set-up take them from Settings. Tests, benchmarks, devkit/ and tools/ are not
scanned."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "label_studio_sam2"
THE_READER = "service/settings.py"

ENV_NAMES = {"environ", "environb", "getenv", "getenvb"}


def env_reads(source: str) -> list[str]:
    """`line: what` for each read of the process environment in `source`: os.environ[...],
    os.environ.get(...), os.getenv(...), **os.environ, `from os import environ` (aliases of `os`
    included); a WSGI `request.environ` is not the process environment."""
    tree = ast.parse(source)
    os_names = {"os"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {a.asname or a.name for a in node.names if a.name == "os"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            for alias in node.names:
                if alias.name in ENV_NAMES:
                    found.append(f"{node.lineno}: from os import {alias.name}")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in ENV_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id in os_names
        ):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return sorted(found, key=lambda s: int(s.split(":")[0]))


def package_env_reads() -> dict[str, list[str]]:
    reads = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == THE_READER:
            continue
        found = env_reads(path.read_text())
        if found:
            reads[rel] = found
    return reads


@pytest.mark.parametrize(
    ("source", "reads"),
    [
        ("import os\nx = os.environ.get('A')", True),
        ("import os\nx = os.environ['A']", True),
        ("import os\nx = os.getenv('A', 'b')", True),
        ("import os\nenv = {**os.environ, 'A': '1'}", True),
        ("import os as _os\nx = _os.environ.get('A')", True),
        ("from os import environ\nx = environ['A']", True),
        ("from os import getenv as g\nx = g('A')", True),
        ("import os\nx = os.path.join('a', 'b')", False),
        ("def view(request):\n    return request.environ['sam2.start']", False),  # WSGI, not the process
    ],
)
def test_the_scan_finds_what_reads_the_environment(source, reads):
    assert bool(env_reads(source)) is reads


def test_no_module_reads_the_environment_but_settings():
    reads = package_env_reads()
    assert not reads, (
        "read the environment outside label_studio_sam2/service/settings.py (add a Settings field, "
        f"pass the value down): {reads}"
    )


def test_the_reader_itself_is_where_the_environment_is_read():
    assert env_reads((PACKAGE / THE_READER).read_text())  # the scan's exception is not empty
