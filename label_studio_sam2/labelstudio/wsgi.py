"""WSGI entry point for gunicorn: `gunicorn -c deploy/gunicorn.conf.py label_studio_sam2.labelstudio.wsgi:app`.

`app` is a placeholder that builds the real Flask app the first time it is needed, in the process
that serves requests. Importing this module creates nothing, loads no model and never touches
CUDA, so even with gunicorn's `preload_app` the master forks clean workers (CUDA cannot survive a
fork). deploy/gunicorn.conf.py calls `app.load()` in each worker right after fork, so every worker
starts loading its own model at once (in a background thread: /health answers meanwhile).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from flask import Flask

from label_studio_sam2.service.logs import setup_logging
from label_studio_sam2.service.settings import Settings


class LazyApp:
    """A WSGI callable that builds its app on first use, once per process."""

    def __init__(self, factory: Callable[[], Flask]):
        self._factory = factory
        self._app: Flask | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._app is not None and self._pid == os.getpid()

    def load(self) -> Flask:
        """The app of this process, built now if it was not yet."""
        if self.loaded:
            return self._app  # type: ignore[return-value]
        with self._lock:
            if not self.loaded:
                # an app built before a fork belongs to the parent (its loader thread did not follow)
                self._app, self._pid = self._factory(), os.getpid()
        return self._app  # type: ignore[return-value]

    def __call__(self, environ, start_response):
        return self.load()(environ, start_response)


def _build() -> Flask:
    from label_studio_sam2.labelstudio.app import (
        create_app,
    )  # imports torch: only in the worker, never the master

    settings = Settings.from_env()
    setup_logging(settings)
    return create_app(settings)


app = LazyApp(_build)
