"""Run a real Label Studio and this backend as processes, for the E2E tests and `make run`.

Label Studio lives in its own virtualenv (.venv-ls, installed by tools/install_ls.sh) so that its
pinned Django stack never constrains ours; we talk to it over HTTP only. What is measured about
running it offline is in shared/LABEL_STUDIO.md; the parts this module relies on:

- Its settings read any LABEL_STUDIO_*, HOST, PORT, USERNAME, PASSWORD... variable of the
  environment, so the server gets a minimal environment of our own, never ours copied.
- A first start migrates SQLite (~20 s here); a data dir that is already migrated boots in a few
  seconds. `template_dir()` is migrated once, with a user and a personal access token, and each
  run copies it (the JWT signing key lives in the data dir, so the token stays valid).
- If the port is taken, Label Studio silently moves to the next one: we check it is free and read
  the port it announces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
LS_VERSION = "1.23.2"
LS_VENV = Path(os.environ.get("LS_VENV", REPO_ROOT / ".venv-ls"))
INSTALL_SCRIPT = REPO_ROOT / "tools" / "install_ls.sh"
BOOTSTRAP_SCRIPT = Path(__file__).with_name("ls_bootstrap.py")
TEMPLATE_FORMAT = 1  # bump when ls_bootstrap.py changes what a data dir holds

DEFAULT_EMAIL = "admin@example.com"
DEFAULT_PASSWORD = "sam2-labeler"
CREDENTIALS_FILE = "sam2-credentials.json"

# Keep Label Studio off the internet (version check, Sentry in server and browser, analytics,
# export converters fetching resources) and let it reach an ML backend on loopback: without
# ML_BLOCK_LOCAL_IP=false it refuses the backend, without SSRF_PROTECTION_ENABLED=false it
# refuses to create the webhook to <backend>/webhook.
OFFLINE_ENV = {
    "LATEST_VERSION_CHECK": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "COLLECT_ANALYTICS": "false",
    "CONVERTER_DOWNLOAD_RESOURCES": "false",
    "ML_BLOCK_LOCAL_IP": "false",
    "SSRF_PROTECTION_ENABLED": "false",
}

# Access tokens live 5 minutes; exchange again a little before that.
ACCESS_TOKEN_REUSE_S = 240


class LabelStudioError(RuntimeError):
    """Label Studio (or the backend beside it) could not be installed, prepared or started."""


# ---------------------------------------------------------------------------------------------
# Installation and data dirs


def install(venv: Path = LS_VENV) -> Path:
    """Install Label Studio into `venv` unless its stamp says it is there; return `label-studio`.

    Raises:
        LabelStudioError: with pip's output when the install fails (no registry, say).
    """
    env = {**os.environ, "LS_VERSION": LS_VERSION}
    proc = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), str(venv)], env=env, capture_output=True, text=True, cwd=REPO_ROOT
    )
    if proc.returncode != 0:
        raise LabelStudioError(f"installing label-studio=={LS_VERSION} failed:\n{proc.stdout}\n{proc.stderr}")
    if proc.stdout.strip():
        print(proc.stdout.strip(), file=sys.stderr)
    executable = venv / "bin" / "label-studio"
    if not executable.exists():
        raise LabelStudioError(f"{executable} is missing after the install")
    return executable


def server_env(data_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a Label Studio process (nothing inherited but PATH and locale)."""
    env = {
        "PATH": f"{LS_VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", str(data_dir)),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "TMPDIR": os.environ.get("TMPDIR", tempfile.gettempdir()),
        "PYTHONUNBUFFERED": "1",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        **OFFLINE_ENV,
    }
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Credentials:
    """The admin user of a data dir. `token` is a personal access token (a JWT refresh token)."""

    email: str
    password: str
    token: str


def bootstrap(data_dir: Path, email: str = DEFAULT_EMAIL, password: str = DEFAULT_PASSWORD) -> Credentials:
    """Migrate `data_dir` (creating it) and make sure it has the admin user and a token."""
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(LS_VENV / "bin" / "python"), str(BOOTSTRAP_SCRIPT), email, password],
        env=server_env(data_dir),
        capture_output=True,
        text=True,
        cwd=data_dir,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise LabelStudioError(f"preparing {data_dir} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    creds = Credentials(**json.loads(lines[-1]))
    path = data_dir / CREDENTIALS_FILE
    path.write_text(json.dumps(creds.__dict__))
    path.chmod(0o600)
    return creds


def template_dir() -> Path:
    return LS_VENV / f"data-template-{LS_VERSION}-v{TEMPLATE_FORMAT}"


def prepare_data_dir(data_dir: Path) -> Credentials:
    """Give `data_dir` a migrated database with the admin user, copied from the template.

    An existing data dir (one `make run` made before) is kept as it is.
    """
    creds_path = data_dir / CREDENTIALS_FILE
    if creds_path.exists():
        return Credentials(**json.loads(creds_path.read_text()))
    template = template_dir()
    if not (template / CREDENTIALS_FILE).exists():
        print(
            "Preparing Label Studio's database (first run only: migrations take about 30 s) ...",
            file=sys.stderr,
            flush=True,
        )
        building = Path(tempfile.mkdtemp(prefix="template-", dir=LS_VENV))
        bootstrap(building)
        try:
            building.rename(template)
        except OSError:  # another run built it meanwhile
            shutil.rmtree(building, ignore_errors=True)
    if data_dir.exists() and any(data_dir.iterdir()):
        raise LabelStudioError(f"{data_dir} is not empty and has no {CREDENTIALS_FILE}")
    shutil.copytree(template, data_dir, dirs_exist_ok=True)
    return Credentials(**json.loads(creds_path.read_text()))


# ---------------------------------------------------------------------------------------------
# Processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C semantics even when our parent ignores SIGINT (a
    background job of a non-interactive shell does, and exec would pass that on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(args: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """A server in its own session (so `_stop_process` stops its children too), output appended
    to `log_path`, no stdin, Ctrl-C semantics restored."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            args,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )


def _stop_process(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGINT the process group we started (Ctrl-C semantics), then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_healthy(
    url: str, process: subprocess.Popen, log_path: Path, timeout_s: float, what: str, ok=None, codes=(200,)
) -> float:
    """Poll `url` until it answers with one of `codes` (and `ok(response)`); return the seconds it took.

    The process is stopped when this fails or is interrupted (Ctrl-C), so nothing is left behind.
    """
    try:
        return _poll_healthy(url, process, log_path, timeout_s, what, ok, codes)
    except BaseException:
        _stop_process(process)
        raise


def _poll_healthy(
    url: str, process: subprocess.Popen, log_path: Path, timeout_s: float, what: str, ok, codes
) -> float:
    start = time.monotonic()
    while True:
        if process.poll() is not None:
            raise LabelStudioError(
                f"{what} exited with code {process.returncode} before answering {url}; log:\n{_log_tail(log_path)}"
            )
        try:
            response = requests.get(url, timeout=2)
            if response.status_code in codes and (ok is None or ok(response)):
                return time.monotonic() - start
        except (requests.RequestException, ValueError):  # not up yet, or not JSON yet
            pass
        if time.monotonic() - start > timeout_s:
            raise LabelStudioError(
                f"{what} did not answer {url} within {timeout_s:.0f} s; log:\n{_log_tail(log_path)}"
            )
        time.sleep(0.2)


@dataclass
class LabelStudio:
    """A running Label Studio server and its admin user.

    `token` is the personal access token (what users paste into LABEL_STUDIO_API_KEY);
    `access_token()` exchanges it for a short-lived bearer token; `client` is a
    label-studio-sdk client (which does that exchange itself).
    """

    url: str
    email: str
    password: str
    token: str
    data_dir: Path
    process: subprocess.Popen
    log_path: Path
    boot_s: float = 0.0
    _access: tuple[str, float] | None = field(default=None, repr=False)
    _client: object | None = field(default=None, repr=False)

    @property
    def username(self) -> str:
        """The login name: Label Studio logs users in by email."""
        return self.email

    def access_token(self) -> str:
        if self._access and time.monotonic() - self._access[1] < ACCESS_TOKEN_REUSE_S:
            return self._access[0]
        response = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token}, timeout=10)
        response.raise_for_status()
        self._access = (response.json()["access"], time.monotonic())
        return self._access[0]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token()}"}

    @property
    def client(self):
        """label_studio_sdk.LabelStudio logged in with the personal access token."""
        if self._client is None:
            from label_studio_sdk import LabelStudio as Client

            self._client = Client(base_url=self.url, api_key=self.token, timeout=120)
        return self._client

    def upload(self, project_id: int, path: Path, content_type: str | None = None) -> dict:
        """Upload a media file into `project_id` (one new task); return that task as a dict."""
        return upload_file(self, project_id, path, content_type)

    def use_token(self, token: str) -> None:
        """Switch to another personal access token (a fresh one after the old was revoked)."""
        self.token = token
        self._access = None
        self._client = None

    def stop(self) -> None:
        _stop_process(self.process)


def token_works(url: str, token: str) -> bool:
    """Whether Label Studio at `url` accepts the personal access token; a revoked (blacklisted)
    or expired one is refused with 401. Other answers (a busy server) raise."""
    response = requests.post(f"{url}/api/token/refresh/", json={"refresh": token}, timeout=10)
    if response.status_code in (400, 401):
        return False
    response.raise_for_status()
    return True


def upload_file(ls: LabelStudio, project_id: int, path: Path, content_type: str | None = None) -> dict:
    """Upload `path` to a project the way the UI's import dialog does; return the new task.

    The task's data then points at /data/upload/<project>/<name>, which needs auth to fetch.
    """
    path = Path(path)
    with path.open("rb") as f:
        response = requests.post(
            f"{ls.url}/api/projects/{project_id}/import",
            params={"return_task_ids": "true"},
            files={"file": (path.name, f, content_type or "application/octet-stream")},
            headers=ls.headers(),
            timeout=60,
        )
    if response.status_code != 201:
        raise LabelStudioError(f"upload of {path.name} failed: {response.status_code} {response.text[:500]}")
    (task_id,) = response.json()["task_ids"]
    task = requests.get(f"{ls.url}/api/tasks/{task_id}", headers=ls.headers(), timeout=30)
    task.raise_for_status()
    return task.json()


def start_label_studio(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: Path | None = None,
    timeout_s: float = 120.0,
    extra_env: dict[str, str] | None = None,
) -> LabelStudio:
    """Start Label Studio on `data_dir` (prepared from the template if new) and wait for /health.

    Raises:
        LabelStudioError: when the port is taken, or the server exits or stays silent.
    """
    data_dir = Path(data_dir).resolve()
    install()
    creds = prepare_data_dir(data_dir)
    port = port or free_port(host)
    if port_in_use(host, port):
        raise LabelStudioError(
            f"port {port} on {host} is already in use; Label Studio would silently take another"
        )
    log_path = Path(log_path or data_dir.parent / "label-studio.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = _spawn(
        [str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser"]
        + ["--internal-host", host, "--port", str(port)],
        server_env(data_dir, extra_env),
        data_dir,
        log_path,
    )
    url = f"http://{host}:{port}"
    boot_s = _wait_healthy(f"{url}/health", process, log_path, timeout_s, "Label Studio")
    if process.poll() is not None or LS_VERSION not in requests.get(f"{url}/version", timeout=10).text:
        _stop_process(process)
        raise LabelStudioError(
            f"something other than our Label Studio answers on {url}; log:\n{_log_tail(log_path)}"
        )
    return LabelStudio(
        url=url,
        email=creds.email,
        password=creds.password,
        token=creds.token,
        data_dir=data_dir,
        process=process,
        log_path=log_path,
        boot_s=boot_s,
    )


@dataclass
class Backend:
    """A running `label-studio-sam2 serve` process."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return _log_tail(self.log_path, 20000)

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=5).json()

    def wait_for_model(self, timeout_s: float = 600.0) -> dict:
        """Poll /health until the model has loaded or failed to; return the last /health body
        (an anonymous caller is told only that the model did not load: the reason is in the log)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise LabelStudioError(
                    f"the SAM2 backend exited with code {self.process.returncode}:\n{self.log()}"
                )
            health = requests.get(f"{self.url}/health", timeout=5).json()
            if health.get("model_loaded") or health.get("error") or time.monotonic() > deadline:
                return health
            time.sleep(0.5)

    def stop(self) -> None:
        _stop_process(self.process)


def make_test_model(model_dir: Path, trained: bool = False) -> Path:
    """Write the backend's tiny SAM2 (HF format) to `model_dir`: random, or the small model
    trained on synthetic shapes (`trained=True`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "label_studio_sam2", "make-test-model", str(model_dir)]
        + (["--trained"] if trained else []),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        raise LabelStudioError(f"make-test-model failed:\n{proc.stdout}\n{proc.stderr}")
    return Path(model_dir)


def start_backend(
    model: str | Path | None,
    label_studio: LabelStudio | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str | None = "cpu",
    log_path: Path | None = None,
    timeout_s: float = 180.0,
    extra_env: dict[str, str] | None = None,
) -> Backend:
    """Start the backend on `model` (None: SAM2_MODEL or its default), able to fetch media from
    `label_studio`; wait until /health answers (the model may still be loading then)."""
    port = port or free_port(host)
    if port_in_use(host, port):
        raise LabelStudioError(f"port {port} on {host} is already in use")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PREFETCH_TASKS"] = "0"  # no background encoding beside a test unless it asks (extra_env)
    if label_studio is not None:
        env["LABEL_STUDIO_URL"] = label_studio.url
        env["LABEL_STUDIO_API_KEY"] = label_studio.token
    env.update(extra_env or {})
    log_path = Path(log_path or Path(tempfile.mkdtemp(prefix="sam2-backend-")) / "backend.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = _spawn(
        [sys.executable, "-m", "label_studio_sam2", "serve", "--host", host, "--port", str(port)]
        + (["--model", str(model)] if model is not None else [])
        + (["--device", device] if device is not None else []),
        env,
        REPO_ROOT,
        log_path,
    )
    url = f"http://{host}:{port}"
    _wait_healthy(
        f"{url}/health",
        process,
        log_path,
        timeout_s,
        "the SAM2 backend",
        # a model that failed to load: 503 "ERROR" (wait_for_model and the demo say why)
        ok=lambda r: r.json().get("status") in ("UP", "ERROR"),
        codes=(200, 503),
    )
    return Backend(url=url, process=process, log_path=log_path)


# ---------------------------------------------------------------------------------------------
# Label Studio API steps shared by the tests and the demo (through label-studio-sdk)


def create_project(ls: LabelStudio, title: str, label_config: str):
    """Create a project; Label Studio wants a title of at least 3 characters."""
    return ls.client.projects.create(title=title, label_config=label_config)


def connect_backend(ls: LabelStudio, project_id: int, backend_url: str, title: str = "SAM2"):
    """Connect an interactive ML backend to a project, as Settings -> Model -> Connect does.

    Label Studio calls /health and /setup while connecting; a backend it could not reach comes
    back with state "ER" and the reason in error_message.
    """
    ml = ls.client.ml.create(project=project_id, url=backend_url, title=title, is_interactive=True)
    ml = ls.client.ml.get(ml.id)
    if ml.state != "CO":
        raise LabelStudioError(
            f"Label Studio could not connect {backend_url}: state {ml.state}, {ml.error_message}"
        )
    return ml


def predict_interactive(ls: LabelStudio, ml_backend_id: int, task_id: int, regions: list[dict]) -> dict:
    """What the labeling UI does on a smart-tool click: returns `results[0]` of the backend.

    Label Studio answers 200 with {"errors": [...]} when the backend call failed; that raises.
    """
    raw = ls.client.ml.with_raw_response.predict_interactive(
        id=ml_backend_id, task=task_id, context={"result": regions}
    )
    body = raw.response.json()
    if "data" not in body:
        raise LabelStudioError(f"interactive pre-annotation failed: {body}")
    if body["data"].get("error"):  # the backend answered the task with an explanation, no regions
        raise LabelStudioError(f"the backend could not answer task {task_id}: {body['data']['error']}")
    return body["data"]


def retrieve_predictions(ls: LabelStudio, project_id: int, task_ids: list[int] | None = None) -> None:
    """The Data Manager action "Retrieve predictions" on the given tasks (all when None).

    Its answer says "Retrieved N predictions" whatever happened: read them back with
    `predictions()`.
    """
    selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
    ls.client.actions.create(id="retrieve_tasks_predictions", project=project_id, selected_items=selected)


def predictions(ls: LabelStudio, task_id: int) -> list:
    """The predictions Label Studio stored for a task."""
    return list(ls.client.predictions.list(task=task_id))


def prediction_counts(ls: LabelStudio, project_id: int) -> dict[int, int]:
    """Task id -> how many predictions Label Studio holds for it (one API call, up to 1000 tasks)."""
    r = requests.get(
        f"{ls.url}/api/tasks",
        params={"project": project_id, "include": "id,total_predictions", "page_size": 1000},
        headers=ls.headers(),
        timeout=10,
    )
    r.raise_for_status()
    return {t["id"]: t["total_predictions"] for t in r.json()["tasks"]}
