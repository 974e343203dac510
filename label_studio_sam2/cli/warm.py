"""`label-studio-sam2 warm`: pre-encode a project's images into the embedding store, here or on the queue's workers."""

from __future__ import annotations

import sys
import time

import label_studio_sam2.labelstudio.queued_job as queued
from label_studio_sam2.cli.options import model_settings
from label_studio_sam2.engine.releases import ModelUnavailable
from label_studio_sam2.labelstudio.api import LabelStudioAPIError, describe
from label_studio_sam2.labelstudio.protocol import parse_label_config
from label_studio_sam2.labelstudio.warm import _api, warm_project
from label_studio_sam2.service.errors import BadRequest
from label_studio_sam2.service.jobqueue import JobQueue, QueueUnavailable
from label_studio_sam2.service.logs import setup_logging
from label_studio_sam2.service.runtime import load_configured_model
from label_studio_sam2.service.settings import Settings


def cmd_warm(args) -> None:
    settings = Settings.from_env(
        **model_settings(args),
        store_dir=args.store,
        label_studio_url=args.url,
        label_studio_api_key=args.api_key,
    )
    setup_logging(settings, "WARNING" if args.quiet else None)
    if args.model_only:
        return _model_only(settings)
    try:
        if args.queue:
            return _queue_warm(settings, args)
        summary = warm_project(
            settings, args.project, after_task=args.after_task, limit=args.limit, progress=not args.quiet
        )
    except (LabelStudioAPIError, ModelUnavailable) as e:  # one line, as the other commands say it
        sys.exit(f"warm: {e}")
    except BadRequest as e:
        sys.exit(f"warm: project {args.project}: {e.message}")
    except Exception as e:
        if type(e).__name__ == "ApiError" or "httpx" in type(e).__module__:  # the SDK, before a call
            sys.exit(f"warm: cannot use Label Studio at {settings.label_studio_url}: {describe(e)}")
        raise
    print(summary.line())
    print(summary.keyed_by())
    for task_id, reason in summary.failed.items():
        print(f"  task {task_id}: {reason}")


def _model_only(settings: Settings) -> None:
    """`warm --model-only`: load the model as the server does (weights found or converted, the
    image encoder converted for ENCODER_RUNTIME and cached), say what serves, and exit."""
    start = time.perf_counter()
    try:
        loaded = load_configured_model(settings)
    except ModelUnavailable as e:
        sys.exit(f"warm: {e}")
    print(f"model {loaded.model_id} ready in {time.perf_counter() - start:.1f} s on {loaded.device}")
    print(f"  encoder runtime {loaded.encoder_runtime}: {loaded.precision}")
    if loaded.ov_encoder is not None:
        print(f"  converted encoder: {loaded.ov_encoder.cache_entry}")


def _queue_warm(settings: Settings, args) -> None:
    """`warm --queue`: the project's images as a run of warm jobs for the queue's workers, which
    encode them into their embedding store (shared with the server: a volume)."""
    if not settings.redis_url:
        raise SystemExit("warm --queue needs REDIS_URL (the Redis the workers listen on)")
    api = _api(settings)
    queue = JobQueue(settings.redis_url, settings.job_chunk_tasks)
    try:
        xml = api.label_config(args.project)
        images = parse_label_config(xml).images()
        if not images:
            raise SystemExit(f"project {args.project}'s label config has no <Image>: nothing to pre-encode")
        queue.workers()  # Redis down: say so before listing the tasks
        ids = [
            t["id"]
            for t in sorted(api.iter_tasks(args.project), key=lambda t: t["id"])
            if args.after_task is None or t["id"] > args.after_task
        ][: args.limit or None]
        started = time.monotonic()
        run = queue.start_run(
            ids,
            project=args.project,
            label_config=xml,
            options={},
            model_version="",
            source="warm",
            kind="warm",
        )
        with queued.ctrl_c_stops_following(args.project):
            print(f"queued {run.total} image(s) of project {args.project} as run {run.id}", flush=True)
            status = queued.follow(queue, run)
    except QueueUnavailable as e:
        raise SystemExit(f"warm: {e.message}") from None
    c = status.counts
    print(
        f"encoded {c.get('done', 0)}, already stored {c.get('skipped', 0)}, failed {c.get('failed', 0)} "
        f"in {time.monotonic() - started:.1f} s"
    )
