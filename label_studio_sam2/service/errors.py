"""Errors a user can act on. Each says what kind of failure it is (`Kind`), never a protocol's
status code: an adapter maps kinds onto its own answers (the Label Studio one onto HTTP statuses,
in one table: label_studio_sam2.labelstudio.middleware.HTTP_STATUS)."""

from __future__ import annotations

import enum
import logging


class Kind(enum.Enum):
    """What went wrong, as a caller of any tool would act on it."""

    INTERNAL = "internal"  # a bug: see the log
    INVALID = "invalid"  # the request itself is malformed
    UNPROCESSABLE = "unprocessable"  # well-formed, but this task cannot be answered (its regions, its media)
    REFUSED = "refused"  # a policy says no (a media host outside MEDIA_ALLOWED_HOSTS, a private address)
    NOT_FOUND = "not_found"  # what the task points at is not there (the media server answered 404)
    TOO_LARGE = "too_large"  # over a size limit (MAX_DOWNLOAD_MB, MAX_IMAGE_MP, MAX_LABEL_CONFIG_KB)
    CONFLICT = "conflict"  # the thing is busy with the same work (a project already training)
    BUSY = "busy"  # too much at once here (MAX_TRAININGS runs)
    DEPENDENCY_FAILED = (
        "dependency_failed"  # what this needs elsewhere is missing or refused (Label Studio's URL, token)
    )
    UPSTREAM_FAILED = "upstream_failed"  # a server this depends on failed (media host, Label Studio)
    UNAVAILABLE = "unavailable"  # not ready or reachable now (the model loading, Redis down): retry
    TIMED_OUT = "timed_out"  # a download or the request ran out of time


class BackendError(Exception):
    kind = Kind.INTERNAL

    def __init__(self, message: str, kind: Kind | None = None):
        super().__init__(message)
        self.message = message
        if kind is not None:
            if not isinstance(kind, Kind):  # a status number, say: the service does not speak HTTP
                raise TypeError(f"an error's kind is a Kind, not {kind!r}")
            self.kind = kind


class BadRequest(BackendError):
    """The request itself is malformed: the whole request is refused."""

    kind = Kind.INVALID


class TaskError(BackendError):
    """One task cannot be answered (its media, its regions): that task gets an empty result with
    this message, the others in the same request are still answered."""

    kind = Kind.UNPROCESSABLE
    log_level = logging.WARNING  # how the server logs it


class MediaError(TaskError):
    """The task's image or video cannot be fetched or decoded."""


class Unavailable(BackendError):
    """The model is not loaded (yet, or at all), or a service it needs is down: with what to do
    about it, and worth retrying."""

    kind = Kind.UNAVAILABLE
