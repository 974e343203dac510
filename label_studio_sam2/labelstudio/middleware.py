"""What every request passes before and after a view: auth, admission, metrics, and the one map
from the service's error kinds to HTTP statuses.

Auth, admission and metrics are plain WSGI middleware (`guard` stacks them), so a second adapter
serving the same runtime wraps its own WSGI app the same way and keeps all three:

    CountRequests      every answer counted and timed by endpoint and outcome (sam2_requests...)
      RequireAuth      basic auth; without it, only this server's own Host names; JSON bodies only
        AdmitRequests  /predict waits in a bounded queue, or a quick 503 with Retry-After
          the app

Outermost first, so an unauthenticated caller never takes an admission slot and every refusal
is counted. /health is the one path that needs no auth (Label Studio probes it).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from base64 import b64decode
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Request

from label_studio_sam2.service.admission import AdmissionQueue
from label_studio_sam2.service.errors import BackendError, Kind
from label_studio_sam2.service.metrics import Metrics
from label_studio_sam2.service.settings import Settings

log = logging.getLogger("label_studio_sam2")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

# The one place a kind of failure becomes an HTTP status.
HTTP_STATUS: dict[Kind, int] = {
    Kind.INTERNAL: 500,
    Kind.INVALID: 400,
    Kind.UNPROCESSABLE: 422,
    Kind.REFUSED: 403,
    Kind.NOT_FOUND: 404,
    Kind.TOO_LARGE: 413,
    Kind.CONFLICT: 409,
    Kind.BUSY: 429,
    Kind.DEPENDENCY_FAILED: 424,
    Kind.UPSTREAM_FAILED: 502,
    Kind.UNAVAILABLE: 503,
    Kind.TIMED_OUT: 504,
}
ENDPOINTS = ("/health", "/setup", "/predict", "/webhook", "/metrics")  # metric labels; the rest: "other"
# What a browser may send cross-site without a CORS preflight is refused on these: they take JSON
# only, and without basic auth only requests addressed to this server's own names.
JSON_ONLY = ("/predict", "/setup", "/webhook")
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def http_status(error: BackendError) -> int:
    return HTTP_STATUS.get(error.kind, 500)


def guard(app: WSGIApp, settings: Settings, metrics: Metrics, admission: AdmissionQueue) -> WSGIApp:
    """`app` behind auth, admission (the runtime's AdmissionQueue, ADMISSION_QUEUE_SIZE) and
    request metrics."""
    return CountRequests(RequireAuth(AdmitRequests(app, admission, metrics), settings), metrics)


def install_error_handlers(app: Flask) -> None:
    """Every error a view raises becomes `{"error": ...}` with its status: a BackendError's kind
    through HTTP_STATUS, Werkzeug's own (404, 405, 413 body too large) as they are, anything else
    a 500 that points at the log."""

    @app.errorhandler(BackendError)
    def _backend_error(e: BackendError):
        resp = jsonify(error=e.message)
        resp.status_code = http_status(e)
        if e.kind is Kind.UNAVAILABLE:
            resp.headers["Retry-After"] = "10"
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        resp = jsonify(error=f"{e.name}: {e.description}")
        resp.status_code = e.code or 500
        return resp

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unexpected error on %.80r", request.path)
        resp = jsonify(error=f"internal error ({type(e).__name__}); see the backend's log")
        resp.status_code = 500
        return resp


def json_error(
    start_response: Callable, status: int, message: str, headers: Iterable[tuple[str, str]] = ()
) -> list[bytes]:
    """Answer `{"error": message}` with `status`, as the views' errors are answered."""
    body = (json.dumps({"error": message}, separators=(",", ":")) + "\n").encode()
    start_response(
        f"{status} {HTTPStatus(status).phrase.upper()}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers],
    )
    return [body]


def has_credentials(headers: Mapping[str, str], settings: Settings) -> bool:
    """The request carries the configured basic auth user and password."""
    header = headers.get("Authorization", "")
    ok = False
    if header.startswith("Basic "):
        try:
            user, _, password = b64decode(header[6:]).decode("utf-8").partition(":")
            ok = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode()) & hmac.compare_digest(
                password.encode(), (settings.basic_auth_pass or "").encode()
            )
        except (ValueError, UnicodeDecodeError):
            ok = False
    return bool(ok)


class RequireAuth:
    """401 without the basic auth credentials (BASIC_AUTH_USER/PASS, when set). On JSON_ONLY
    paths, also: 403, without basic auth, for a `Host` that is not this server's (DNS rebinding:
    a page whose name resolves to the backend's address), and 415 for a POST body that is not
    declared JSON (a web page can POST text/plain or a form to any address without a CORS
    preflight)."""

    def __init__(self, app: WSGIApp, settings: Settings, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.settings, self.open_paths = app, settings, open_paths

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        req = Request(environ)
        if req.path in self.open_paths:
            return self.app(environ, start_response)
        settings = self.settings
        if settings.basic_auth_user and not has_credentials(req.headers, settings):
            message = "authentication required: set the backend's basic auth user/password in Label Studio"
            return json_error(
                start_response, 401, message, [("WWW-Authenticate", 'Basic realm="label-studio-sam2"')]
            )
        if req.path not in JSON_ONLY:
            return self.app(environ, start_response)
        host = req.headers.get("Host", "")
        if not settings.basic_auth_user and not _own_host(host, settings.allowed_hosts):
            message = (
                f"Host {host[:80]!r} is not one of this backend's names: add the name Label Studio uses "
                "to reach the backend to ALLOWED_HOSTS (loopback names are always accepted), or set "
                "BASIC_AUTH_USER/BASIC_AUTH_PASS"
            )
            return json_error(start_response, 403, message)
        if req.method == "POST" and req.mimetype != "application/json":
            message = f"{req.path} takes only Content-Type: application/json (this request sent {req.mimetype[:60]!r})"
            return json_error(start_response, 415, message)
        return self.app(environ, start_response)


def _host_name(header: str) -> str:
    """The host name of a `Host` header, without its port, lower-case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1 : header.find("]")] if "]" in header else header[1:]
    else:
        name, _, port = header.rpartition(":")
        if not name or not port.isdigit():
            name = header
    return name.removesuffix(".")


def _own_host(header: str, allowed: tuple[str, ...]) -> bool:
    """`Host` names this server: a loopback name or address, or one of ALLOWED_HOSTS."""
    name = _host_name(header)
    if "*" in allowed or name in allowed or name in _LOOPBACK_NAMES:
        return bool(name)
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class AdmitRequests:
    """POSTs to `paths` (the ones that queue for the model) enter `queue` or get a quick 503 with
    a Retry-After estimate; they leave it when the app has answered."""

    def __init__(
        self, app: WSGIApp, queue: AdmissionQueue, metrics: Metrics, paths: tuple[str, ...] = ("/predict",)
    ):
        self.app, self.queue, self.metrics, self.paths = app, queue, metrics, paths

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST" or Request(environ).path not in self.paths:
            return self.app(environ, start_response)
        if not self.queue.try_enter():
            self.metrics.admission_rejected.inc()
            message = "the SAM2 backend is busy (its request queue is full); try again shortly"
            return json_error(
                start_response, 503, message, [("Retry-After", str(self.queue.retry_after_s()))]
            )
        start = environ.get("sam2.start", time.perf_counter())
        try:
            return self.app(environ, start_response)
        finally:
            self.queue.leave(time.perf_counter() - start)


class CountRequests:
    """Counts and times every answer by endpoint and outcome ("ok" below 400, else the status);
    sets `sam2.start` in the environ, the request's start for the views' logs."""

    def __init__(self, app: WSGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        start = environ["sam2.start"] = time.perf_counter()
        path = Request(environ).path
        endpoint = path if path in ENDPOINTS else "other"

        def counted(status: str, headers: list, exc_info=None):
            code = int(status.split(" ", 1)[0])
            outcome = "ok" if code < 400 else str(code)
            self.metrics.requests.labels(endpoint, outcome).inc()
            self.metrics.latency.labels(endpoint, outcome).observe(time.perf_counter() - start)
            self.metrics.publish()  # gunicorn workers: this worker's gauges, for the others' scrapes
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        return self.app(environ, counted)
