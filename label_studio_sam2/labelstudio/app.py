"""Flask app factory: the Label Studio ML backend protocol.

/health  GET  -> {"status": "UP", "model_class": ..., "model_loaded": bool}   (no auth: LS probes it;
                 a model that failed to load: 503 {"status": "ERROR", "error": ...}, the loading
                 error itself only for callers with the basic auth credentials)
/setup   POST -> {"model_version": ...}   (cheap: LS gives it 3 s; the label config is remembered)
/predict POST -> {"results": [one entry per task]}
/webhook POST -> 200 for any event (LS creates the webhook itself)
/metrics GET  -> Prometheus text format

Views parse, call and serialise; the work is in label_studio_sam2.service.segment (images) and label_studio_sam2.service.video.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import sys
import threading
import time
from base64 import b64decode
from collections import OrderedDict
from typing import Any

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from label_studio_sam2.labelstudio.protocol import (
    answer_each,
    check_task_ids,
    interactive,
    parse_context,
    parse_label_config,
    task_data_url,
)
from label_studio_sam2.labelstudio.retrieve import retrieve_worker
from label_studio_sam2.labelstudio.video import predict_video_task
from label_studio_sam2.service.admission import AdmissionQueue
from label_studio_sam2.service.errors import BackendError, BadRequest, Unavailable
from label_studio_sam2.service.finetuned import project_id
from label_studio_sam2.service.media import request_deadline
from label_studio_sam2.service.metrics import Metrics
from label_studio_sam2.service.runtime import Runtime
from label_studio_sam2.service.settings import Settings

log = logging.getLogger("label_studio_sam2")

MODEL_CLASS = "SAM2"


def _has_credentials(settings: Settings) -> bool:
    """The request carries the configured basic auth user and password."""
    header = request.headers.get("Authorization", "")
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


def _check_basic_auth(settings: Settings) -> Response | None:
    if not settings.basic_auth_user or _has_credentials(settings):
        return None
    resp = jsonify(
        error="authentication required: set the backend's basic auth user/password in Label Studio"
    )
    resp.status_code = 401
    resp.headers["WWW-Authenticate"] = 'Basic realm="label-studio-sam2"'
    return resp


# What a browser may send cross-site without a CORS preflight is refused on these: they take JSON
# only, and without basic auth only requests addressed to this server's own names.
_JSON_ONLY = ("/predict", "/setup", "/webhook")
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


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


def _refuse_cross_site(settings: Settings) -> Response | None:
    """415 for a body that is not declared JSON (a web page can POST text/plain or a form to any
    address without a CORS preflight); 403, without basic auth, for a `Host` that is not this
    server's (DNS rebinding: a page whose name resolves to the backend's address)."""
    if request.path not in _JSON_ONLY:
        return None
    if not settings.basic_auth_user and not _own_host(
        request.headers.get("Host", ""), settings.allowed_hosts
    ):
        resp = jsonify(
            error=f"Host {request.headers.get('Host', '')[:80]!r} is not one of this backend's names: "
            "add the name Label Studio uses to reach the backend to ALLOWED_HOSTS (loopback names are "
            "always accepted), or set BASIC_AUTH_USER/BASIC_AUTH_PASS"
        )
        resp.status_code = 403
        return resp
    if request.method == "POST" and request.mimetype != "application/json":
        resp = jsonify(
            error=f"{request.path} takes only Content-Type: application/json "
            f"(this request sent {request.mimetype[:60]!r})"
        )
        resp.status_code = 415
        return resp
    return None


def create_app(settings: Settings | None = None, loaded_model=None) -> Flask:
    """Build the app. `loaded_model` (a label_studio_sam2.engine.models.LoadedModel) skips loading from settings
    (tests pass a tiny in-process model); otherwise the model loads in a background thread."""
    settings = settings or Settings.from_env()
    settings.check()  # auth fails closed: half a basic auth pair or an empty password never serves
    app = Flask("label-studio-sam2")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_mb << 20  # JSON: tasks and regions, not media
    metrics = Metrics()
    runtime = Runtime(settings, metrics, loaded_model)
    app.extensions["sam2"] = runtime
    schemas = SchemaCache(int(settings.setup_cache_mb * (1 << 20)))  # project id -> label config from /setup
    app.extensions["sam2.schemas"] = schemas

    @app.before_request
    def _auth():
        request.environ["sam2.start"] = time.perf_counter()
        if request.path == "/health":
            return None
        return _check_basic_auth(settings) or _refuse_cross_site(settings)

    queue = AdmissionQueue(settings.queue_size)
    metrics.watch_queue(queue)

    @app.before_request
    def _admit():
        # after auth (an unauthenticated caller never takes a slot); only /predict queues for the model
        if request.path != "/predict" or request.method != "POST":
            return None
        if not queue.try_enter():
            metrics.queue_rejected.inc()
            resp = jsonify(error="the SAM2 backend is busy (its request queue is full); try again shortly")
            resp.status_code = 503
            resp.headers["Retry-After"] = str(queue.retry_after_s())
            return resp
        request.environ["sam2.admitted"] = True
        return None

    @app.teardown_request
    def _release(_exc):
        if request.environ.pop("sam2.admitted", False):
            queue.leave(time.perf_counter() - request.environ["sam2.start"])

    @app.after_request
    def _count(resp):
        endpoint = (
            request.path
            if request.path in ("/health", "/setup", "/predict", "/webhook", "/metrics")
            else "other"
        )
        outcome = "ok" if resp.status_code < 400 else str(resp.status_code)
        metrics.requests.labels(endpoint, outcome).inc()
        start = request.environ.get("sam2.start")
        if start is not None:
            metrics.latency.labels(endpoint, outcome).observe(time.perf_counter() - start)
        metrics.publish()  # gunicorn workers: this worker's gauges, for the others' scrapes
        return resp

    @app.errorhandler(BackendError)
    def _backend_error(e: BackendError):
        resp = jsonify(error=e.message)
        resp.status_code = e.status if e.status >= 400 else 500
        if isinstance(e, Unavailable):
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

    def _json_body() -> dict:
        body = parse_json_body(request.get_data(cache=True))
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    @app.get("/health")
    @app.get("/")
    def health():
        # Anyone who reaches the port may ask: no model path, no error text (both in the log);
        # a caller with the basic auth credentials gets the loading error too.
        # A model that failed to load is a 503 "ERROR": Label Studio then lists the backend as
        # Disconnected (and refuses to connect it) instead of Connected with every click a 503.
        # While the model still loads it is "UP": Label Studio may connect, clicks wait for it.
        failed = runtime.error is not None
        answer = dict(
            status="ERROR" if failed else "UP",
            model_class=MODEL_CLASS,
            model_loaded=runtime.segmenter is not None,
            model_version=runtime.model_version,
        )
        if failed:
            answer["error"] = (
                runtime.error
                if settings.basic_auth_user and _has_credentials(settings)
                else "the model could not be loaded; see the backend's log"
            )
        return jsonify(answer), 503 if failed else 200

    @app.post("/setup")
    def setup():
        body = _json_body()
        schema = body.get("schema")
        project = project_id(body.get("project"))
        if isinstance(schema, str) and schema:
            _check_config_size(schema, settings)
            parse_label_config(schema)  # a broken config is reported now, not at the first click
            if project is not None:
                schemas.put(project, schema)
        if runtime.project_segmenters is not None:  # a fine-tuned project has its own version
            return jsonify(model_version=runtime.project_segmenters.get(project).model_version)
        return jsonify(model_version=runtime.model_version)

    @app.post("/webhook")
    def webhook():
        try:
            body = parse_json_body(request.get_data(cache=True))
        except BadRequest as e:
            log.warning("webhook: ignoring a body that is not JSON this backend accepts (%s)", e.message)
            body = None
        action = body.get("action") if isinstance(body, dict) else None
        log.debug("webhook %.80r", action)
        if action == "START_TRAINING":  # the "Start Training" button (and every Nth annotation)
            project = project_id(body.get("project"))
            if project is None:
                raise BadRequest("START_TRAINING without a project id")
            return jsonify(runtime.start_training(project))
        return jsonify(status="ok", action=action)

    @app.get("/metrics")
    def metrics_view():
        return Response(metrics.scrape(), mimetype=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks")
        check_task_ids(tasks)  # before any is kept or logged
        project = project_id(body.get("project"))
        xml = body.get("label_config") or schemas.get(project)
        if isinstance(xml, str):
            _check_config_size(xml, settings)
        config = parse_label_config(xml)
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        context = params.get("context") if params.get("context") is not None else body.get("context")
        # Video regions are read by label_studio_sam2.service.video; image regions become SAM2 prompts here.
        objects = (
            []
            if config.videos()
            else parse_context(
                context,
                config,
                max_regions=settings.max_regions_per_task,
                max_points=settings.max_points_per_task,
            )
        )
        segmenter = runtime.segmenter_for(project)
        deadline = time.monotonic() + settings.predict_deadline_s
        metrics.in_flight.inc()
        try:
            work, paced = _task_worker(
                runtime, segmenter, settings, config, xml, context, objects, deadline, project
            )
            # "Retrieve predictions" (no regions in the context): a task that fails gets [] so Label
            # Studio stores nothing and a later Retrieve tries it again; interactive calls get the
            # error message with the empty result.
            asked = bool(objects) or bool(isinstance(context, dict) and context.get("result"))
            # no download outlives the request (Retrieve paces its downloads itself)
            with contextlib.nullcontext() if paced else request_deadline(deadline):
                results = answer_each(
                    tasks,
                    work,
                    segmenter.model_version,
                    errors_as_entries=asked,
                    deadline=None if paced else deadline,
                )
            finish = getattr(work, "finish", None)
            if finish is not None:
                finish()  # queue what Retrieve handed off (REDIS_URL); Redis down: a 503 that says so
        finally:
            metrics.in_flight.dec()
        for entry in results:
            # [] answers a task handed to the background job (Label Studio stores nothing for it)
            outcome = "handed_off" if entry == [] else "error" if entry.get("error") else "ok"
            metrics.tasks.labels(outcome).inc()
        skipped = getattr(work, "skipped", None)
        if not asked and skipped:
            # Label Studio says "Retrieved N predictions" even when it stored none: say why here. A
            # task opened (one task, no context) with nothing to predict is no news.
            log.log(
                logging.WARNING if len(results) > 1 else logging.INFO,
                "retrieve: %d of %d task(s) got no prediction (%s); Label Studio stores nothing for them",
                sum(skipped.values()),
                len(results),
                ", ".join(f"{n} {why}" for why, n in skipped.most_common()),
            )
        if not asked:
            # Without regions in the context (a task opened, "Retrieve predictions") Label Studio
            # stores every entry as a prediction of this model version and never asks again for
            # that task; for [] it stores nothing, so a task with nothing to predict stays open.
            results = [[] if isinstance(e, dict) and not e["result"] else e for e in results]
        if objects and runtime.prefetcher is not None and project is not None:
            # the labeler is working here: pre-encode the next tasks while the CPU/GPU is idle
            runtime.prefetcher.after_click(project, tasks[0].get("id"))
        log.info(
            "predict: %d task(s), %d region(s) in context, %d result region(s), %.3f s",
            len(results),
            len(objects) or _count_list(context.get("result") if isinstance(context, dict) else None),
            sum(len(e["result"]) for e in results if e != []),
            time.perf_counter() - request.environ["sam2.start"],
        )
        return jsonify(results=results, model_version=segmenter.model_version)

    return app


class SchemaCache:
    """The label configs /setup was sent, per project: an LRU bounded by bytes (SETUP_CACHE_MB),
    so a stream of /setup calls for made-up projects never grows the process. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, project: int | None) -> str | None:
        with self._lock:
            xml = self._items.get(project)
            if xml is not None:
                self._items.move_to_end(project)
            return xml

    def put(self, project: int, xml: str) -> None:
        size = _entry_size(project, xml)
        with self._lock:
            old = self._items.pop(project, None)
            if old is not None:
                self.bytes -= _entry_size(project, old)
            if size > self.max_bytes:
                return
            self._items[project] = xml
            self.bytes += size
            while self.bytes > self.max_bytes:
                key, dropped = self._items.popitem(last=False)
                self.bytes -= _entry_size(key, dropped)


def _entry_size(project: int, xml: str) -> int:
    return sys.getsizeof(project) + sys.getsizeof(xml) + 100  # and a share for the dict entry


def _check_config_size(xml: str, settings: Settings) -> None:
    limit = settings.max_label_config_kb << 10
    size = len(xml) if len(xml) > limit else len(xml.encode("utf-8", "replace"))  # UTF-8 bytes
    if size > limit:
        raise BackendError(
            f"the label config is {size >> 10} KB or more, over the limit of "
            f"{settings.max_label_config_kb} KB (MAX_LABEL_CONFIG_KB)",
            413,
        )


def _count_list(value) -> int:
    return len(value) if isinstance(value, list) else 0


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number this backend accepts")


def _parse_int(text: str) -> int:
    # Label Studio itself sends integers beyond 2**53 (its START_TRAINING webhook's project carries
    # 64-bit values), so only integers no float can hold are refused: arithmetic on them would raise.
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"integer {text[:20]}... is too large") from None
    return value


def parse_json_body(data: bytes) -> Any:
    """The request body as JSON, or BadRequest (400) for anything malformed: invalid JSON, nesting
    deep enough to exhaust the parser's recursion, NaN/Infinity, and integers and floats too large
    for a float."""
    try:
        text = data.decode("utf-8")
        return json.loads(
            text, parse_constant=_refuse_constant, parse_int=_parse_int, parse_float=_parse_float
        )
    except RecursionError:
        raise BadRequest("the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(
            f"the request body must be a JSON object; it is not valid JSON: {str(e)[:120]}"
        ) from None


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is too large")
    return value


def _task_worker(
    runtime: Runtime, segmenter, settings: Settings, config, xml, context, objects, deadline, project
):
    """What /predict does for one task, chosen by the label config and the context, and whether
    it keeps the deadline itself (Retrieve hands what does not fit to the background job)."""
    videos = config.videos()
    if not videos and not objects and settings.retrieve_mode in ("boxes", "auto"):
        # "Retrieve predictions": boxes to masks or automatic masks by the bulk engine, which
        # answers what fits before the deadline and hands the rest to the background job
        return retrieve_worker(runtime, config, deadline, segmenter, project=project), True

    def work(task: dict) -> dict[str, Any]:
        if videos:
            return _video_task(runtime, settings, task, config, xml, context, deadline, project)
        # no objects: an empty entry
        return interactive(segmenter, task, config, objects, project=project, deadline=deadline)

    return work, False


def _video_task(
    runtime: Runtime, settings: Settings, task, config, xml, context, deadline, project: int | None
) -> dict | list:
    regions = context.get("result") if isinstance(context, dict) else None
    if isinstance(regions, list) and len(regions) > settings.max_regions_per_task:
        raise BadRequest(
            f"the task has {len(regions)} regions, over the limit of {settings.max_regions_per_task} "
            "(MAX_REGIONS_PER_TASK)"
        )
    if regions is not None:  # interactive: shown, not stored; every request gets its answer
        return _track_video(runtime, settings, task, config, xml, regions, deadline, project)
    # Label Studio 1.23.2 asks twice at once for a task it reloads: track it once, or it stores
    # two identical predictions (the second request answers with nothing)
    key = (project, task.get("id"), json.dumps(task, sort_keys=True, default=str), runtime.model_version)
    with runtime.video_calls.once(key, timeout_s=max(0.0, deadline - time.monotonic())) as first:
        if not first:
            log.info(
                "video task %s: tracked by a concurrent identical request; answering this one with nothing",
                task.get("id"),
            )
            return []
        return _track_video(runtime, settings, task, config, xml, regions, deadline, project)


def _track_video(
    runtime: Runtime, settings: Settings, task, config, xml, regions, deadline, project
) -> dict | list:
    url = task_data_url(task, config, config.videos()[0].name)
    task_id = task.get("id")
    # Retrieve (no regions in the context) with REDIS_URL: a track the deadline cuts goes to the
    # job queue, which writes it whole, instead of Label Studio storing a partial one
    queue = runtime.job_queue() if regions is None and settings.background_job else None
    if queue is not None and (not isinstance(task_id, int) or project is None):
        queue = None  # the worker reads the task from Label Studio and checks it is the project's
    if queue is not None and _held(queue, task_id):
        return []  # queued by an earlier request, still on its way
    with runtime.media.lazy_file(url, task_id) as download:  # only once there is a region to track
        entry = predict_video_task(
            task,
            regions,
            xml,
            download,
            runtime.video_tracker(),
            deadline_s=max(1.0, deadline - time.monotonic()),
            max_frames=settings.video_max_frames,
            model_version=runtime.model_version,
            max_pixels=int(settings.max_image_mp * 1e6),
            max_regions=settings.max_regions_per_task,
        )
    if entry.pop("partial") and queue is not None:
        run = queue.start_run(
            [task_id],
            project=project,
            label_config="",  # the worker reads the project's from Label Studio
            options={},
            model_version=runtime.model_version,
            source="retrieve",
            kind="video",
        )
        queue.hold([task_id])
        log.info(
            "video task %r: the track outlives the request; queued whole as run %s (%d worker(s) listening)",
            task_id,
            run.id,
            queue.workers(),
        )
        return []  # Label Studio stores nothing now; the worker writes the whole track
    return entry


def _held(queue, task_id: int) -> bool:
    try:
        return queue.holds(task_id)
    except Unavailable:  # Redis down: track now; queueing, if it comes to that, says so
        return False
