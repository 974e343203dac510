"""Label Studio's API as bulk pre-annotation uses it (label-studio-sdk), with retries."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from label_studio_sdk import LabelStudio

from label_studio_sam2.labelstudio.auth import LabelStudioAuth  # noqa: F401 (its media credentials, for the runtime)
from label_studio_sam2.service.errors import BackendError, Kind, MediaError

log = logging.getLogger("label_studio_sam2.bulk")


def predicted_versions(predictions) -> set[str]:
    """The model versions of the predictions (dicts or label-studio-sdk objects) that hold at
    least one region. An empty prediction does not count: earlier versions of this backend
    answered a task with nothing to predict with an empty result, which Label Studio stored."""
    versions = set()
    for p in predictions or []:
        get = p.get if isinstance(p, dict) else lambda k, p=p: getattr(p, k, None)
        if get("result"):
            versions.add(get("model_version"))
    return versions


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed (after retries, if it was worth retrying)."""


def describe(e: BaseException) -> str:
    """An error in one line, without headers or secrets (SDK errors print their headers)."""
    status = getattr(e, "status_code", None)
    if status is not None or type(e).__name__ == "ApiError":
        body = getattr(e, "body", None)
        detail = body.get("detail") if isinstance(body, dict) else body
        return f"HTTP {status}: {str(detail)[:200]}" if detail else f"HTTP {status}"
    if isinstance(e, BackendError):
        return e.message
    return f"{type(e).__name__}: {str(e)[:200]}"


def _retryable(e: BaseException) -> bool:
    if isinstance(e, httpx.TransportError):  # connection refused / reset, timeouts
        return True
    if isinstance(e, MediaError):
        return e.kind in (Kind.UPSTREAM_FAILED, Kind.UNAVAILABLE, Kind.TIMED_OUT)
    status = getattr(e, "status_code", None)
    if type(e).__name__ == "ApiError":
        return status is None or status == 429 or status >= 500
    return False


@dataclass
class Retry:
    """Retry with exponential backoff on what may pass: connection errors, timeouts, HTTP 429 and
    5xx from Label Studio, 502/503/504 fetching media. Anything else fails at once."""

    attempts: int = 5
    base_s: float = 1.0
    max_s: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    def call(self, fn: Callable[[], Any], what: str) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if attempt >= self.attempts or not _retryable(e):
                    raise
                delay = min(self.max_s, self.base_s * 2 ** (attempt - 1))
                log.warning(
                    "%s failed (%s); retry %d of %d in %.0f s",
                    what,
                    describe(e),
                    attempt,
                    self.attempts - 1,
                    delay,
                )
                self.sleep(delay)
        raise AssertionError("unreachable")


def project_task(api: LabelStudioAPI, task_id: int, project: int | None) -> dict:
    """Task `task_id` as Label Studio has it, read with the backend's own token, and checked to
    belong to `project`. Everything the backend writes to Label Studio is predicted from this,
    never from a copy of the task a request sent (anyone who can reach /predict can send one).
    LabelStudioAPIError when it cannot be read, is another project's, or there is no project."""
    if project is None:
        raise LabelStudioAPIError("no project to check the task against; not predicted")
    task = api.task(task_id)
    owner = task.get("project") if isinstance(task, dict) else None
    if isinstance(owner, dict):
        owner = owner.get("id")
    if type(owner) is not int or owner != project or task.get("id") != task_id:
        raise LabelStudioAPIError(f"not a task of project {project!r} in Label Studio; not predicted")
    return task


def write_if_absent(
    api: LabelStudioAPI,
    task_id: int,
    model_version: str,
    predict: Callable[[], tuple[dict | None, str | None]],
) -> tuple[str, str | None]:
    """The one "write the prediction only if absent": predict task `task_id` and write the entry
    as `model_version` unless the task already has a (non-empty) prediction of that version,
    checked before predicting (no work for a task done already) and again on the write itself
    (`create_prediction`, on every retry). `predict()` -> (entry, why) with entry None or
    without regions when there is nothing to write: an empty prediction is never stored (it would
    hide the task from the next Retrieve). Returns ("done", None) or ("skipped", why); errors of
    `predict` and of the API propagate. Retrieve's background job and the queue's workers (images
    and videos) write through it."""
    already = f"already has a prediction of {model_version}"
    if model_version in api.prediction_versions(task_id):
        return "skipped", already
    entry, why = predict()
    if entry is None or not entry.get("result"):
        return "skipped", why or "no mask found"
    if api.create_prediction(task_id, entry, model_version):
        return "done", None
    return "skipped", already


class LabelStudioAPI:
    """The few Label Studio calls bulk pre-annotation makes, through label-studio-sdk (which
    exchanges a personal access token for access tokens itself), each retried with `retry`.
    Errors come out as LabelStudioAPIError with the HTTP status and Label Studio's detail."""

    PAGE_SIZE = 100

    def __init__(self, url: str, api_key: str, retry: Retry | None = None, timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        self.retry = retry or Retry()
        # never redirected: the token goes to LABEL_STUDIO_URL's origin only
        self.client = LabelStudio(
            base_url=self.url, api_key=api_key, timeout=timeout_s, max_retries=0, follow_redirects=False
        )
        httpx_log = logging.getLogger("httpx")
        if httpx_log.level == logging.NOTSET:  # a line per request at INFO: keep it for DEBUG runs
            httpx_log.setLevel(logging.WARNING)

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return self.retry.call(fn, what)
        except LabelStudioAPIError:
            raise
        except Exception as e:
            if type(e).__name__ == "ApiError" or _retryable(e):
                raise LabelStudioAPIError(f"{what}: {describe(e)}") from None
            raise

    def label_config(self, project_id: int) -> str:
        project = self._call(lambda: self.client.projects.get(id=project_id), f"reading project {project_id}")
        return project.label_config

    def iter_tasks(
        self, project_id: int, query: str | None = None, view: int | None = None
    ) -> Iterator[dict]:
        """Brief tasks: {id, data, predictions_model_versions, total_annotations}, page by page."""
        page, seen = 1, 0
        while True:

            def fetch(page=page):
                pager = self.client.tasks.list(
                    project=project_id,
                    include="id,data,predictions_model_versions,total_annotations",
                    query=query,
                    view=view,
                    page=page,
                    page_size=self.PAGE_SIZE,
                )  # one page per call, so each page is retried on its own
                tasks = [t.model_dump(mode="json", exclude_none=True) for t in pager.items or []]
                return tasks, int(getattr(pager.response, "total", 0) or 0)

            tasks, total = self._call(fetch, f"listing the tasks of project {project_id} (page {page})")
            yield from tasks
            seen += len(tasks)
            if not tasks or seen >= total:
                return
            page += 1

    def task(self, task_id: int) -> dict:
        """The whole task as Label Studio's JSON (annotations and predictions included)."""
        return self._call(
            lambda: self.client.tasks.with_raw_response.get(id=str(task_id)).response.json(),
            f"reading task {task_id}",
        )

    def prediction_versions(self, task_id: int) -> set[str]:
        """The model versions of the task's predictions, empty ones left out (`predicted_versions`)."""
        return self._call(
            lambda: predicted_versions(self.client.predictions.list(task=task_id)),
            f"reading the predictions of task {task_id}",
        )

    def create_prediction(self, task_id: int, entry: dict, model_version: str) -> bool:
        """Write one prediction unless the task already has a non-empty one of `model_version`
        (checked on every attempt, so a retry after a lost response does not write it twice).
        True if written."""

        def attempt() -> bool:
            if model_version in predicted_versions(self.client.predictions.list(task=task_id)):
                return False
            self.client.predictions.create(
                task=task_id, result=entry["result"], score=entry.get("score"), model_version=model_version
            )
            return True

        return self._call(attempt, f"writing the prediction of task {task_id}")
