"""The runtime as Label Studio's adapter builds it: the service's `Runtime` with Label Studio's
media credentials (the configured URL and token: relative `/data/...` paths and cloud URIs are
fetched from Label Studio with them). Every place that builds a runtime for Label Studio (the app,
the CLIs, the worker, the pre-encoding job) builds it here; the service itself knows no tool.
"""

from __future__ import annotations

from label_studio_sam2.labelstudio.auth import LabelStudioAuth
from label_studio_sam2.service.runtime import Runtime
from label_studio_sam2.service.settings import Settings


def media_auth(settings: Settings) -> LabelStudioAuth:
    """Label Studio's credentials for the media client, from the settings."""
    return LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key)


def runtime_for(settings: Settings, metrics=None, loaded=None, *, load_in_background: bool = True) -> Runtime:
    """`Runtime(settings, metrics, loaded, load_in_background=...)` with Label Studio's media
    credentials."""
    return Runtime(
        settings, metrics, loaded, load_in_background=load_in_background, auth=media_auth(settings)
    )
