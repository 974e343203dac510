"""Session fixtures for the E2E tests: one real Label Studio and one real backend process.

Reusable by any test under tests/ that talks to Label Studio (the bulk pre-annotation CLI tests,
say): request `label_studio` and `backend_server`, and upload media with `label_studio.upload()`.
Label Studio that cannot be installed or started is an error, never a skip.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from devkit import lsserver

OUTPUT_DIR = Path(os.environ.get("E2E_OUTPUT_DIR", lsserver.REPO_ROOT / "test-output" / "e2e"))


@pytest.fixture(scope="session")
def e2e_output_dir() -> Path:
    """Where screenshots of the E2E run are kept (test-output/e2e/ unless E2E_OUTPUT_DIR). The
    servers' logs stay in pytest's temp dirs, one per session, and their paths are printed."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory, e2e_output_dir):
    """A real Label Studio 1.23.2 on 127.0.0.1 with SQLite in a temp dir, stopped at the end.

    Yields lsserver.LabelStudio: .url, .token (personal access token), .access_token(),
    .username/.password (the browser login), .client (label-studio-sdk), .upload(project, path).
    """
    start = time.monotonic()
    root = tmp_path_factory.mktemp("label-studio")
    ls = lsserver.start_label_studio(root / "data", log_path=root / "label-studio.log")
    print(
        f"\nLabel Studio up at {ls.url} in {time.monotonic() - start:.1f} s (boot {ls.boot_s:.1f} s), log {ls.log_path}"
    )
    yield ls
    ls.stop()


@pytest.fixture(scope="session")
def backend_model_dir(tmp_path_factory) -> Path:
    """The tiny SAM2 trained on synthetic shapes (`make-test-model --trained`): it segments the
    sample scenes' objects, so the tests can check that a mask lands where the click was."""
    return lsserver.make_test_model(tmp_path_factory.mktemp("backend-model") / "sam2-shapes", trained=True)


@pytest.fixture(scope="session")
def backend_server(label_studio, backend_model_dir, tmp_path_factory):
    """`python -m label_studio_sam2 serve` on a free port with the tiny model, able to fetch LS media.

    Yields lsserver.Backend (.url, .log(), .log_path); stopped at the end of the session.
    """
    log_path = tmp_path_factory.mktemp("backend") / "backend.log"
    backend = lsserver.start_backend(backend_model_dir, label_studio, log_path=log_path, timeout_s=120)
    yield backend
    backend.stop()


@pytest.fixture(autouse=True)
def _backend_log_has_no_errors(request):
    """Any server error logged by the backend during a test fails that test, even one that Label
    Studio swallowed (a failed webhook, a /predict answered 500 during "Retrieve predictions")."""
    if "backend_server" not in request.fixturenames:
        yield
        return
    backend = request.getfixturevalue("backend_server")
    offset = backend.log_path.stat().st_size
    yield
    with backend.log_path.open("rb") as f:
        f.seek(offset)
        new = f.read().decode(errors="replace")
    bad = [line for line in new.splitlines() if "Traceback" in line or '" 500 ' in line or " ERROR " in line]
    assert not bad, "the backend logged errors during this test:\n" + "\n".join(bad[:20])
