"""The server against hostile input: slow clients under the real gunicorn, malformed bodies,
auth that fails closed, /health that reveals nothing, per-task errors and the request deadline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from devkit import gunicorn as devkit_gunicorn
from devkit.lsserver import free_port
from label_studio_sam2.labelstudio.views import parse_json_body, parse_project_id
from label_studio_sam2.service.settings import Settings, SettingsError
from tests.conftest import keypoint, noise_image, predict_body, rectangle
from tests.test_deploy import _basic, wait_loaded

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
PASS = "s3cret-basic-pass"


def _clean_env(**extra) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "MEDIA_"))
    }
    return {**env, **extra}


# --- 5. slow clients cannot starve the server (real gunicorn) ------------------------------------


def _slowloris(port: int, stop: threading.Event, cut: list) -> None:
    """Send request headers one byte every 0.3 s, without credentials; note when cut off."""
    request = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 200
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            for i in range(len(request)):
                if stop.is_set():
                    return
                s.sendall(request[i : i + 1])
                time.sleep(0.3)
                if i % 5 == 0:
                    s.setblocking(False)
                    try:
                        if s.recv(1) == b"":
                            cut.append(time.monotonic() - started)
                            return
                    except BlockingIOError:
                        pass
                    finally:
                        s.setblocking(True)
    except OSError:  # reset or broken pipe: cut off as well
        cut.append(time.monotonic() - started)


def start_gunicorn(tiny_model_dir, port: int, log_path: Path, **env) -> subprocess.Popen:
    settings = dict(WORKERS="1", THREADS="3", ADMISSION_QUEUE_SIZE="2", TORCH_THREADS="1", ACCESS_LOG="0")
    settings |= dict(BASIC_AUTH_USER="ml", BASIC_AUTH_PASS=PASS, MEDIA_ALLOWED_HOSTS="127.0.0.1")
    return devkit_gunicorn.start_gunicorn(tiny_model_dir, port, log_path, **(settings | env))


def test_slow_header_clients_do_not_starve_health_or_clicks(tiny_model_dir, media_server, tmp_path):
    """Ten clients trickling headers against 3 threads: /health and an authenticated click still
    answer within a few seconds, and the trickling clients are cut off after HEADER_TIMEOUT_S."""
    port = free_port()
    log = tmp_path / "gunicorn.log"
    proc = start_gunicorn(tiny_model_dir, port, log, HEADER_TIMEOUT_S="4")
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    cut: list[float] = []
    try:
        wait_loaded(base, proc, log)
        url = media_server.add_image("a.png", noise_image(48, 64))
        click = predict_body([{"id": 1, "data": {"image": url}}], [keypoint(50, 50)])
        slow = [threading.Thread(target=_slowloris, args=(port, stop, cut), daemon=True) for _ in range(10)]
        for t in slow:
            t.start()
        time.sleep(1.5)  # every thread would now be holding a slow connection
        t0 = time.monotonic()
        assert requests.get(f"{base}/health", timeout=5).status_code == 200
        health_s = time.monotonic() - t0
        t0 = time.monotonic()
        resp = requests.post(f"{base}/predict", json=click, headers=_basic("ml", PASS), timeout=10)
        click_s = time.monotonic() - t0
        assert resp.status_code == 200 and resp.json()["results"][0]["result"], resp.text
        assert health_s < 2.0 and click_s < 5.0, (health_s, click_s)
        with requests.Session() as kept_alive:  # Label Studio reuses connections: so does this
            for _ in range(3):
                assert kept_alive.get(f"{base}/health", timeout=5).status_code == 200
        for t in slow:
            t.join(12)
        assert len(cut) == 10 and all(0 < s < 8 for s in cut), cut  # disconnected, not served
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)


def test_gunicorn_refuses_to_start_with_half_an_auth_pair(tmp_path):
    for env in ({"BASIC_AUTH_USER": "ml"}, {"BASIC_AUTH_USER": "ml", "BASIC_AUTH_PASS": ""}):
        out = subprocess.run(
            [
                str(Path(PY).with_name("gunicorn")),
                "-c",
                "deploy/gunicorn.conf.py",
                "label_studio_sam2.labelstudio.wsgi:app",
            ],
            cwd=REPO,
            env=_clean_env(PORT=str(free_port()), HOST="127.0.0.1", **env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0
        assert "BASIC_AUTH_PASS" in out.stdout + out.stderr


# --- 7. auth fails closed ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, message",
    [
        ({"BASIC_AUTH_USER": "ml"}, "only BASIC_AUTH_USER"),
        ({"BASIC_AUTH_PASS": "x"}, "only BASIC_AUTH_PASS"),
        ({"BASIC_AUTH_USER": "ml", "BASIC_AUTH_PASS": ""}, "empty"),
        ({"BASIC_AUTH_USER": "ml", "BASIC_AUTH_PASS": "   "}, "empty"),
    ],
)
def test_auth_fails_closed(monkeypatch, env, message):
    for k in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError, match=message):
        Settings.from_env()


def test_serve_refuses_to_start_with_a_clear_message():
    out = subprocess.run(
        [PY, "-m", "label_studio_sam2", "serve", "--port", str(free_port()), "--host", "127.0.0.1"],
        cwd=REPO,
        env=_clean_env(BASIC_AUTH_USER="ml"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "BASIC_AUTH_PASS" in out.stderr and "Traceback" not in out.stderr


def test_create_app_checks_settings_built_in_code(tiny_model):
    from label_studio_sam2.labelstudio.app import create_app

    with pytest.raises(SettingsError):
        create_app(Settings(basic_auth_user="ml"), loaded_model=tiny_model)


# --- 9. /health reveals nothing private ----------------------------------------------------------


def test_health_hides_model_path_and_error_from_anonymous_callers(tmp_path):
    from label_studio_sam2.labelstudio.app import create_app

    missing = tmp_path / "secret-models" / "customer-x"
    settings = Settings(model=str(missing), basic_auth_user="ml", basic_auth_pass=PASS)
    app = create_app(settings)
    runtime = app.extensions["sam2"]
    runtime.load()  # fails: the directory does not exist
    assert runtime.error and "customer-x" in runtime.error
    client = app.test_client()
    anonymous = client.get("/health")
    assert anonymous.status_code == 503 and anonymous.get_json()["model_loaded"] is False
    assert "customer-x" not in anonymous.get_data(as_text=True)
    assert "secret-models" not in anonymous.get_data(as_text=True)
    authed = client.get("/health", headers=_basic("ml", PASS)).get_json()
    assert "customer-x" in authed["error"]


# --- 6. malformed bodies are 4xx, bad tasks cost only themselves -----------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        ("[" * 100_000 + "]" * 100_000, "JSON"),
        ('{"tasks": [{"id": 1' + "0" * 400 + "}]}", "too large"),
        ('{"tasks": [{"id": 1e999}]}', "too large"),
        ('{"tasks": [{"id": NaN}]}', "NaN"),
        (b"\xff\xfe{", "JSON"),
    ],
)
def test_hostile_json_is_a_400(client, raw, message):
    for path in ("/predict", "/setup"):
        resp = client.post(path, data=raw, content_type="application/json")
        assert resp.status_code in (400, 422), resp.get_data(as_text=True)[:200]
        assert message in resp.get_json()["error"]
    assert client.post("/webhook", data=raw, content_type="application/json").status_code == 200
    assert client.get("/health").status_code == 200


def test_label_studio_s_own_64_bit_integers_are_accepted():
    """The real Label Studio 1.23.2 sends START_TRAINING with a project holding integers beyond
    2**53 (seen in the E2E test): refusing them ignored every "Start Training"."""
    body = parse_json_body(b'{"action": "START_TRAINING", "project": {"id": 3, "h": 7938231679830192776}}')
    assert body["project"]["h"] == 7938231679830192776


def test_huge_coordinates_are_a_4xx_not_a_500(client, media_server):
    url = media_server.add_image("a.png", noise_image(48, 64))
    for value in (1e308, -1e308, 2**53):
        region = keypoint(50, 50)
        region["value"]["x"] = value
        resp = client.post("/predict", json=predict_body([{"id": 1, "data": {"image": url}}], [region]))
        assert resp.status_code < 500, resp.get_data(as_text=True)[:300]


BOX_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="object"/></RectangleLabels>
</View>"""


def test_retrieve_one_bad_task_never_costs_the_others(app_factory, media_server):
    client = app_factory(background_job=False).test_client()
    good = media_server.add_image("g.png", noise_image(48, 64))
    box = rectangle(20, 20, 40, 40)
    tasks = [
        {"id": 1, "data": {"image": good}, "annotations": [{"id": 1, "result": [box]}]},
        {"id": 2, "data": {"image": "http://[::1/x.png"}, "annotations": [{"id": 2, "result": [box]}]},
        {"id": 3, "data": {"image": "http://169.254.169.254/x"}, "annotations": [{"id": 3, "result": [box]}]},
        {"id": 4, "data": {"image": ["not", "a", "url"]}, "annotations": [{"id": 4, "result": [box]}]},
        {"id": 5, "data": {"image": good}, "annotations": [{"id": 5, "result": "garbage"}]},
        {"id": 6, "data": {"image": good}, "annotations": [{"id": 6, "result": [box]}]},
    ]
    resp = client.post("/predict", json=predict_body(tasks, None, BOX_CONFIG))
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    results = resp.get_json()["results"]
    assert len(results) == 6
    assert results[0]["result"] and results[5]["result"]  # the good tasks are answered


def test_interactive_request_respects_the_deadline(app_factory, media_server):
    """Tasks not started by PREDICT_DEADLINE_S get an error entry instead of running."""
    import http.server

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(10)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = app_factory(predict_deadline_s=1.0, download_timeout_s=30).test_client()
        slow_url = f"http://127.0.0.1:{httpd.server_address[1]}/a.png"
        good = media_server.add_image("g.png", noise_image(48, 64))
        tasks = [{"id": 1, "data": {"image": slow_url}}, {"id": 2, "data": {"image": good}}]
        t0 = time.monotonic()
        resp = client.post("/predict", json=predict_body(tasks, [keypoint(50, 50)]))
        elapsed = time.monotonic() - t0
        results = resp.get_json()["results"]
        assert resp.status_code == 200 and len(results) == 2
        assert "took longer" in results[0]["error"] and "ran out of time" in results[1]["error"]
        assert elapsed < 6, elapsed  # cut at the 1 s deadline, not after the server's 10 s
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- cross-site requests, DNS rebinding, request-supplied ids --------------------------------------

SETUP = {"project": "1.1795498385", "schema": "<View></View>", "hostname": "http://127.0.0.1:8080"}


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_json_endpoints_take_only_json_so_a_web_page_cannot_post_without_a_preflight(client, content_type):
    """A page a labeler opens may POST text/plain or a form to any address without a CORS
    preflight: the JSON endpoints refuse such a body (415), whatever it holds."""
    for path, body in (("/predict", predict_body([{"id": 1, "data": {}}], None)), ("/setup", SETUP)):
        raw = __import__("json").dumps(body)
        headers = {} if content_type is None else {"Content-Type": content_type}
        resp = client.post(path, data=raw, headers=headers)
        assert resp.status_code == 415, (path, resp.status_code)
        assert "application/json" in resp.get_json()["error"]
    resp = client.post("/webhook", data='{"action": "START_TRAINING", "project": 1}', headers=headers)
    assert resp.status_code == 415
    assert client.post("/setup", json=SETUP).status_code == 200  # what Label Studio sends
    assert (
        client.post(
            "/setup", data=__import__("json").dumps(SETUP), content_type="application/json; charset=utf-8"
        ).status_code
        == 200
    )
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_without_auth_only_the_server_s_own_host_names_are_answered(app_factory):
    """DNS rebinding: a page at attacker.example whose name then resolves to 127.0.0.1 reaches a
    loopback-bound backend with `Host: attacker.example`. Without basic auth only loopback names
    and ALLOWED_HOSTS are answered; /health and /metrics stay reachable."""
    client = app_factory().test_client()
    for host in ("attacker.example", "attacker.example:9090", "sam2:9090", "127.0.0.1.attacker.example", ""):
        for path, body in (("/setup", SETUP), ("/predict", predict_body([{"id": 1, "data": {}}], None))):
            resp = client.post(path, json=body, headers={"Host": host})
            assert resp.status_code == 403, (host, path, resp.status_code)
            assert "ALLOWED_HOSTS" in resp.get_json()["error"]
        assert client.post("/webhook", json={"action": "x"}, headers={"Host": host}).status_code == 403
        assert client.get("/health", headers={"Host": host}).status_code == 200
        assert client.get("/metrics", headers={"Host": host}).status_code == 200
    for host in (
        "localhost",
        "localhost:9090",
        "127.0.0.1:9090",
        "[::1]:9090",
        "LOCALHOST.:9090",
        "127.0.0.2",
    ):
        assert client.post("/setup", json=SETUP, headers={"Host": host}).status_code == 200, host
    # docker-compose: Label Studio reaches the backend as http://sam2:9090
    compose = app_factory(allowed_hosts="sam2,ml.example.org").test_client()
    for host in ("sam2:9090", "sam2", "ML.example.org:443"):
        assert compose.post("/setup", json=SETUP, headers={"Host": host}).status_code == 200, host
    assert compose.post("/setup", json=SETUP, headers={"Host": "attacker.example"}).status_code == 403
    # with basic auth the credentials are the guard, whatever name the backend is reached by
    authed = app_factory(basic_auth_user="ls", basic_auth_pass=PASS).test_client()
    resp = authed.post("/setup", json=SETUP, headers={"Host": "gpu-box.lan:9090", **_basic("ls", PASS)})
    assert resp.status_code == 200
    assert authed.post("/setup", json=SETUP, headers={"Host": "gpu-box.lan"}).status_code == 401


@pytest.mark.parametrize(
    "project", ["²", "1²", str(10**300), 10**300, 10**18, "-1", "0", 0, "1e3", True, [1], "٣"]
)
def test_project_ids_are_ascii_digits_of_bounded_length(client, project):
    """ "²" is a digit to str.isdigit but not to int(); 10**300 made a file name too long: both
    answered 500."""
    for path, body in (
        ("/predict", {**predict_body([{"id": 1, "data": {}}], None), "project": project}),
        ("/setup", {**SETUP, "project": project}),
        ("/webhook", {"action": "START_TRAINING", "project": project}),
        ("/webhook", {"action": "START_TRAINING", "project": {"id": project}}),
    ):
        resp = client.post(path, json=body)
        assert resp.status_code == 400, (path, resp.status_code, resp.get_data(as_text=True)[:200])
        assert "project" in resp.get_json()["error"] and len(resp.get_json()["error"]) < 300


def test_label_studio_s_project_ids_are_accepted():
    assert (
        parse_project_id("12.1795498385") == 12
        and parse_project_id(12) == 12
        and parse_project_id({"id": 12}) == 12
    )
    assert (
        parse_project_id(str(10**18 - 1)) == 10**18 - 1
        and parse_project_id(None) is None
        and parse_project_id("") is None
    )


@pytest.mark.parametrize(
    "task_id", ["1\n2026-12-06 01:00:00 INFO backend: forged", "x" * 1_000_000, "7", 10**18, -3, True, 1.5]
)
def test_task_ids_are_bounded_integers_before_they_are_kept_or_logged(client, caplog, task_id):
    """A task id with a newline forged a log line and a 1 MB id wrote a 1 MB line."""
    body = predict_body(
        [{"id": 1, "data": {}}, {"id": task_id, "data": {"image": "data:,"}}], [keypoint(50, 50)]
    )
    with caplog.at_level("DEBUG"):
        resp = client.post("/predict", json=body)
        hook = client.post("/webhook", json={"action": "X\nINFO forged" + "y" * 100_000})
    assert resp.status_code == 400 and "task id" in resp.get_json()["error"]
    assert len(resp.get_json()["error"]) < 300
    assert hook.status_code == 200
    for record in caplog.records:
        assert "\n" not in record.getMessage() and len(record.getMessage()) < 1000, record.getMessage()[:200]
