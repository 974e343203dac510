"""The Label Studio ML backend's views: each parses its request, calls the runtime and
serialises the answer. Auth, admission and metrics are middleware (label_studio_sam2.labelstudio.middleware);
the work is in label_studio_sam2.service.segment (images) and label_studio_sam2.service.video.

/health  GET  -> {"status": "UP", "model_class": ..., "model_loaded": bool, once loaded "device",
                 "encoder_runtime" and "precision"}   (no auth: LS probes it;
                 a model that failed to load: 503 {"status": "ERROR", "error": ...}, the loading
                 error itself only for callers with the basic auth credentials)
/setup   POST -> {"model_version": ...}   (cheap: LS gives it 3 s; the label config is remembered)
/predict POST -> {"results": [one entry per task]}
/webhook POST -> 200 for any event (LS creates the webhook itself)
/metrics GET  -> Prometheus text format
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, NewType

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST

from label_studio_sam2.labelstudio.middleware import has_credentials
from label_studio_sam2.labelstudio.protocol import (
    LabelConfig,
    answer_each,
    check_task_ids,
    interactive,
    parse_context,
    parse_label_config,
    task_data_url,
)
from label_studio_sam2.labelstudio.retrieve import background_job, background_job_holds, retrieve_worker
from label_studio_sam2.labelstudio.video import predict_video_task
from label_studio_sam2.service.errors import BackendError, BadRequest, Kind, Unavailable
from label_studio_sam2.service.media import request_deadline
from label_studio_sam2.service.runtime import Runtime
from label_studio_sam2.service.schemas import SchemaCache
from label_studio_sam2.service.settings import Settings

log = logging.getLogger("label_studio_sam2")

MODEL_CLASS = "SAM2"

ProjectId = NewType("ProjectId", int)  # a Label Studio project id, parsed: a positive int
MAX_ID_DIGITS = 18  # Label Studio's ids are 64-bit; 18 digits always fit one (and a file name)
_ID = re.compile(f"[0-9]{{1,{MAX_ID_DIGITS}}}")


def parse_project_id(value) -> ProjectId | None:
    """Label Studio's project field ("12.1700000000" in /predict and /setup, 12 or {"id": 12} in
    webhooks) as an int: the one place a request's project id is parsed. None when there is none
    (missing or empty); BadRequest (400) for anything else that is not a positive id of ASCII
    digits, at most MAX_ID_DIGITS of them ("²" is a digit to str.isdigit, not to int)."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or value == "":
        return None
    if type(value) is int:
        number = value if 0 < value < 10**MAX_ID_DIGITS else None
    elif isinstance(value, str) and _ID.fullmatch(value.split(".")[0]):
        number = int(value.split(".")[0]) or None
    else:
        number = None
    if number is None:
        raise BadRequest(
            f"project {str(value)[:40]!r} is not a Label Studio project id "
            f"(a positive integer, ASCII digits, at most {MAX_ID_DIGITS})"
        )
    return ProjectId(number)


def register_views(app: Flask, runtime: Runtime) -> None:
    """The backend's routes on `app`, each a thin view over `runtime`."""
    views = Views(runtime)
    app.add_url_rule("/health", "health", views.health, methods=["GET"])
    app.add_url_rule("/", "health", views.health, methods=["GET"])
    app.add_url_rule("/setup", "setup", views.setup, methods=["POST"])
    app.add_url_rule("/webhook", "webhook", views.webhook, methods=["POST"])
    app.add_url_rule("/metrics", "metrics", views.metrics, methods=["GET"])
    app.add_url_rule("/predict", "predict", views.predict, methods=["POST"])


class Views:
    """The protocol's endpoints over one runtime (its settings, metrics and label configs)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings

    def health(self):
        # Anyone who reaches the port may ask: no model path, no error text (both in the log);
        # a caller with the basic auth credentials gets the loading error too.
        # A model that failed to load is a 503 "ERROR": Label Studio then lists the backend as
        # Disconnected (and refuses to connect it) instead of Connected with every click a 503.
        # While the model still loads it is "UP": Label Studio may connect, clicks wait for it.
        runtime, settings = self.runtime, self.settings
        failed = runtime.error is not None
        answer = dict(
            status="ERROR" if failed else "UP",
            model_class=MODEL_CLASS,
            model_loaded=runtime.segmenter is not None,
            model_version=runtime.model_version,
        )
        if runtime.image_model is not None:  # what serves: ENCODER_RUNTIME and CPU_PRECISION's outcome
            loaded = runtime.image_model
            answer.update(
                device=str(loaded.device), encoder_runtime=loaded.encoder_runtime, precision=loaded.precision
            )
        if failed:
            answer["error"] = (
                runtime.error
                if settings.basic_auth_user and has_credentials(request.headers, settings)
                else "the model could not be loaded; see the backend's log"
            )
        return jsonify(answer), 503 if failed else 200

    def setup(self):
        runtime = self.runtime
        body = json_body()
        schema = body.get("schema")
        project = parse_project_id(body.get("project"))
        if isinstance(schema, str) and schema:
            _check_config_size(schema, self.settings)
            parse_label_config(schema)  # a broken config is reported now, not at the first click
            if project is not None:
                runtime.schemas.put(project, schema)
        if runtime.project_segmenters is not None:  # a fine-tuned project has its own version
            return jsonify(model_version=runtime.project_segmenters.get(project).model_version)
        return jsonify(model_version=runtime.model_version)

    def webhook(self):
        try:
            body = parse_json_body(request.get_data(cache=True))
        except BadRequest as e:
            log.warning("webhook: ignoring a body that is not JSON this backend accepts (%s)", e.message)
            body = None
        action = body.get("action") if isinstance(body, dict) else None
        log.debug("webhook %.80r", action)
        if action == "START_TRAINING":  # the "Start Training" button (and every Nth annotation)
            project = parse_project_id(body.get("project"))
            if project is None:
                raise BadRequest("START_TRAINING without a project id")
            return jsonify(self.runtime.start_training(project))
        return jsonify(status="ok", action=action)

    def metrics(self):
        return Response(self.runtime.metrics.scrape(), mimetype=CONTENT_TYPE_LATEST)

    def predict(self):
        runtime = self.runtime
        ask = read_predict_request(json_body(), self.settings, runtime.schemas)
        segmenter = runtime.segmenter_for(ask.project)
        results, work = _answer(runtime, segmenter, ask)
        results = _conclude(runtime, ask, results, work)
        return jsonify(results=results, model_version=segmenter.model_version)


@dataclass
class PredictRequest:
    """A /predict body, read and checked."""

    tasks: list
    project: ProjectId | None
    xml: str | None  # the label config: sent with the request, else the one /setup was sent
    config: LabelConfig
    context: Any  # the regions on the task now: Label Studio's {"result": [...]}, or None
    objects: list  # image regions as SAM2 prompts ([] for video: label_studio_sam2.service.video reads those)

    @property
    def asked(self) -> bool:
        """Regions in the context: an interactive call. Without (a task opened, "Retrieve
        predictions") a task that fails gets [] so Label Studio stores nothing and a later
        Retrieve tries it again; interactive calls get the error message with the empty result."""
        return bool(self.objects) or bool(isinstance(self.context, dict) and self.context.get("result"))


def read_predict_request(body: dict, settings: Settings, schemas: SchemaCache) -> PredictRequest:
    tasks = body.get("tasks")
    check_task_ids(tasks)  # before any is kept or logged
    project = parse_project_id(body.get("project"))
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
    return PredictRequest(tasks, project, xml, config, context, objects)


def _answer(runtime: Runtime, segmenter, ask: PredictRequest) -> tuple[list, Any]:
    """One entry per task, and the worker that made them."""
    settings, metrics = runtime.settings, runtime.metrics
    deadline = time.monotonic() + settings.predict_deadline_s
    metrics.in_flight.inc()
    try:
        work, paced = _task_worker(
            runtime, segmenter, settings, ask.config, ask.xml, ask.context, ask.objects, deadline, ask.project
        )
        # no download outlives the request (Retrieve paces its downloads itself)
        with contextlib.nullcontext() if paced else request_deadline(deadline):
            results = answer_each(
                ask.tasks,
                work,
                segmenter.model_version,
                errors_as_entries=ask.asked,
                deadline=None if paced else deadline,
            )
        finish = getattr(work, "finish", None)
        if finish is not None:
            finish()  # queue what Retrieve handed off (REDIS_URL); Redis down: a 503 that says so
    finally:
        metrics.in_flight.dec()
    return results, work


def _conclude(runtime: Runtime, ask: PredictRequest, results: list, work) -> list:
    """Count and log the answer, start prefetching after a click; the entries as Label Studio
    should get them."""
    for entry in results:
        # [] answers a task handed to the background job (Label Studio stores nothing for it)
        outcome = "handed_off" if entry == [] else "error" if entry.get("error") else "ok"
        runtime.metrics.tasks.labels(outcome).inc()
    skipped = getattr(work, "skipped", None)
    if not ask.asked and skipped:
        # Label Studio says "Retrieved N predictions" even when it stored none: say why here. A
        # task opened (one task, no context) with nothing to predict is no news.
        log.log(
            logging.WARNING if len(results) > 1 else logging.INFO,
            "retrieve: %d of %d task(s) got no prediction (%s); Label Studio stores nothing for them",
            sum(skipped.values()),
            len(results),
            ", ".join(f"{n} {why}" for why, n in skipped.most_common()),
        )
    if not ask.asked:
        # Without regions in the context (a task opened, "Retrieve predictions") Label Studio
        # stores every entry as a prediction of this model version and never asks again for
        # that task; for [] it stores nothing, so a task with nothing to predict stays open.
        results = [[] if isinstance(e, dict) and not e["result"] else e for e in results]
    if ask.objects and runtime.prefetcher is not None and ask.project is not None:
        # the labeler is working here: pre-encode the next tasks while the CPU/GPU is idle
        runtime.prefetcher.after_click(ask.project, ask.tasks[0].get("id"))
    context = ask.context
    log.info(
        "predict: %d task(s), %d region(s) in context, %d result region(s), %.3f s",
        len(results),
        len(ask.objects) or _count_list(context.get("result") if isinstance(context, dict) else None),
        sum(len(e["result"]) for e in results if e != []),
        time.perf_counter() - request.environ["sam2.start"],
    )
    return results


def json_body() -> dict:
    """The request's body: a JSON object, or BadRequest."""
    body = parse_json_body(request.get_data(cache=True))
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _check_config_size(xml: str, settings: Settings) -> None:
    limit = settings.max_label_config_kb << 10
    size = len(xml) if len(xml) > limit else len(xml.encode("utf-8", "replace"))  # UTF-8 bytes
    if size > limit:
        raise BackendError(
            f"the label config is {size >> 10} KB or more, over the limit of "
            f"{settings.max_label_config_kb} KB (MAX_LABEL_CONFIG_KB)",
            Kind.TOO_LARGE,
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
    # Without it, to the process's background job (a thread on the server's model), likewise.
    retrieve = (
        regions is None and settings.background_job and isinstance(task_id, int) and project is not None
    )
    # (the job reads the task from Label Studio and checks it is the project's)
    queue = runtime.job_queue() if retrieve else None
    if queue is not None and _held(queue, task_id):
        return []  # queued by an earlier request, still on its way
    if retrieve and queue is None and background_job_holds(runtime, task_id):
        return []  # handed to the background job by an earlier request, still on its way
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
    partial = entry.pop("partial")
    if partial and queue is not None:
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
    job = background_job(runtime) if partial and retrieve and queue is None else None
    if job is not None:
        job.submit(task_id, project, None)
        log.info("video task %r: the track outlives the request; handed whole to the background job", task_id)
        return []  # Label Studio stores nothing now; the background job writes the whole track
    return entry


def _held(queue, task_id: int) -> bool:
    try:
        return queue.holds(task_id)
    except Unavailable:  # Redis down: track now; queueing, if it comes to that, says so
        return False
