"""Flask app factory: the Label Studio ML backend protocol.

The app is the runtime (label_studio_sam2.service.runtime: the model and everything around it),
the views over it (label_studio_sam2.labelstudio.views: /health, /setup, /predict, /webhook,
/metrics), the error handlers, and the middleware every request passes: request metrics, auth and
admission (label_studio_sam2.labelstudio.middleware). All per-process state lives on the runtime.
"""

from __future__ import annotations

from flask import Flask

from label_studio_sam2.labelstudio.middleware import guard, install_error_handlers
from label_studio_sam2.labelstudio.runtime import runtime_for
from label_studio_sam2.labelstudio.views import register_views
from label_studio_sam2.service.metrics import Metrics
from label_studio_sam2.service.settings import Settings


def create_app(settings: Settings | None = None, loaded_model=None) -> Flask:
    """Build the app. `loaded_model` (a label_studio_sam2.engine.models.LoadedModel) skips loading from settings
    (tests pass a tiny in-process model); otherwise the model loads in a background thread."""
    settings = settings or Settings.from_env()
    settings.check()  # auth fails closed: half a basic auth pair or an empty password never serves
    app = Flask("label-studio-sam2")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_mb << 20  # JSON: tasks and regions, not media
    runtime = runtime_for(settings, Metrics(), loaded_model)  # with Label Studio's media credentials
    app.extensions["sam2"] = runtime
    register_views(app, runtime)
    install_error_handlers(app)
    # metrics, auth, admission
    app.wsgi_app = guard(app.wsgi_app, settings, runtime.metrics, runtime.admission)
    return app
