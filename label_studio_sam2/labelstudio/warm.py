"""Pre-encoding a Label Studio project: `label-studio-sam2 warm --project ID` reads the project's
label config and tasks through the LS API and encodes each task's image into the embedding store
(the encoding itself, resumable, is the service's: label_studio_sam2.service.warm.encode_items).
"""

from __future__ import annotations

from label_studio_sam2.labelstudio.api import LabelStudioAPI
from label_studio_sam2.labelstudio.protocol import LabelConfig, parse_label_config
from label_studio_sam2.labelstudio.runtime import runtime_for
from label_studio_sam2.service.settings import Settings
from label_studio_sam2.service.warm import WarmSummary, encode_items


def _api(settings: Settings):
    """The Label Studio API client bulk pre-annotation uses (label-studio-sdk, with retries)."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise SystemExit(
            "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a personal access token or legacy token), "
            "or pass --url and --api-key"
        )
    return LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key)


def warm_project(
    settings: Settings,
    project: int,
    *,
    after_task: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    api=None,
    loaded=None,
) -> WarmSummary:
    """Encode the images of a project's tasks into the store. Downloads overlap encoding."""
    if not settings.store_dir:
        raise SystemExit("set EMBEDDING_STORE_DIR (or --store DIR): pre-encoding fills that store")
    api = api or _api(settings)
    config: LabelConfig = parse_label_config(api.label_config(project))
    images = config.images()
    if not images:
        raise SystemExit(f"project {project}'s label config has no <Image>: nothing to pre-encode")
    runtime = runtime_for(settings, loaded=loaded, load_in_background=False)  # what the server builds
    if loaded is None:
        runtime.load()
    todo = []
    tasks = sorted(api.iter_tasks(project), key=lambda t: t["id"])  # "next tasks" means by id
    for task in tasks:
        if after_task is not None and task["id"] <= after_task:
            continue
        url = (task.get("data") or {}).get(images[0].value_key)
        if isinstance(url, str) and url:
            todo.append((task["id"], url))
        if limit and len(todo) >= limit:
            break
    return encode_items(runtime, todo, progress)
