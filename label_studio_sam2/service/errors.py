"""Errors a user can act on. Each carries the HTTP status it maps to."""

from __future__ import annotations

import logging


class BackendError(Exception):
    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(BackendError):
    """The request itself is malformed: the whole request gets a 4xx."""

    status = 400


class TaskError(BackendError):
    """One task cannot be answered (its media, its regions): that task gets an empty result with
    this message, the others in the same request are still answered."""

    status = 422
    log_level = logging.WARNING  # how the server logs it


class MediaError(TaskError):
    """The task's image or video cannot be fetched or decoded."""


class Unavailable(BackendError):
    """The model is not loaded (yet, or at all): 503, with what to do about it."""

    status = 503
