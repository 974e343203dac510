"""`label-studio-sam2 preannotate --project ID [--mode boxes|auto] ...`"""

from __future__ import annotations

import logging
import sys
import time

import label_studio_sam2.labelstudio.queued_job as queued
from label_studio_sam2.cli.options import model_settings, stop_on_signals
from label_studio_sam2.engine.models import set_cpu_threads
from label_studio_sam2.engine.releases import ModelUnavailable
from label_studio_sam2.labelstudio.api import LabelStudioAPI, LabelStudioAPIError, Retry, describe
from label_studio_sam2.labelstudio.bulk import Preannotator
from label_studio_sam2.labelstudio.project_job import Selection, run_project
from label_studio_sam2.labelstudio.protocol import parse_label_config
from label_studio_sam2.labelstudio.runtime import runtime_for
from label_studio_sam2.service.bulk import PreannotateOptions
from label_studio_sam2.service.errors import BadRequest
from label_studio_sam2.service.jobqueue import JobQueue, QueueUnavailable
from label_studio_sam2.service.logs import setup_logging
from label_studio_sam2.service.runtime import load_configured_model
from label_studio_sam2.service.settings import Settings

log = logging.getLogger("label_studio_sam2.bulk")


def cmd_preannotate(args) -> None:
    settings = Settings.from_env(
        **model_settings(args), label_studio_url=args.url, label_studio_api_key=args.api_key
    )
    setup_logging(settings)
    if not (args.status or args.cancel) and not (settings.label_studio_url and settings.label_studio_api_key):
        sys.exit("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --url / --api-key) to reach Label Studio")
    try:
        options = PreannotateOptions.from_settings(
            settings,
            mode=args.mode,
            boxes_from=args.boxes_from,
            output=args.output,
            polygon_tolerance_px=args.tolerance,
            auto_label=args.label,
            roi_label=args.roi_label,
            points_per_side=args.points_per_side,
            auto_fast=args.fast,
            min_area_px=args.min_area,
            iou_thresh=args.iou_thresh,
            stability_thresh=args.stability_thresh,
            max_masks=args.max_masks,
        )
        selection = Selection(args.filter, args.view, args.tasks)
        selection.query()
    except ValueError as e:
        sys.exit(f"preannotate: {e}")
    if args.queue or args.status or args.cancel:
        return _queued(args, settings, options, selection)
    set_cpu_threads(args.threads)

    stop = stop_on_signals("task")

    try:
        api = LabelStudioAPI(
            settings.label_studio_url, settings.label_studio_api_key, Retry(attempts=max(1, args.retries))
        )
        # fail fast, before the model loads: a wrong URL, token, project id or label config
        Preannotator(None, options).check(parse_label_config(api.label_config(args.project)))
        loaded = load_configured_model(settings)
    except (LabelStudioAPIError, ModelUnavailable) as e:
        sys.exit(f"preannotate: {e}")
    except BadRequest as e:
        sys.exit(f"preannotate: project {args.project}: {e.message}")
    except Exception as e:  # the SDK refuses an expired token while constructing
        sys.exit(f"preannotate: cannot use Label Studio at {settings.label_studio_url}: {describe(e)}")
    runtime = runtime_for(settings, loaded=loaded)
    segmenter = runtime.segmenter_for(args.project)  # the project's fine-tuned decoder, if any
    log.info("model %s on %s; model_version %s", loaded.source, loaded.device, segmenter.model_version)
    try:
        summary = run_project(
            api,
            args.project,
            segmenter,
            options,
            model_version=args.model_version or segmenter.model_version,
            selection=selection,
            prefetch=args.prefetch,
            stop=stop,
        )
    except (BadRequest, LabelStudioAPIError) as e:
        sys.exit(f"preannotate: {e.message if isinstance(e, BadRequest) else e}")
    print(summary.report(), flush=True)
    sys.exit(summary.exit_code)


def _queued(args, settings: Settings, options: PreannotateOptions, selection: Selection) -> None:
    """--queue, --status, --cancel: through the job queue in REDIS_URL (no model loads here)."""
    if not settings.redis_url:
        sys.exit(
            "preannotate: --queue, --status and --cancel need REDIS_URL (the Redis the workers listen on)"
        )
    queue = JobQueue(settings.redis_url, settings.job_chunk_tasks)
    try:
        if args.status:
            queued.print_status(queue, args.project)
            return
        if args.cancel:
            runs = queue.cancel(args.project)
            for status in runs:
                print("cancelled " + status.line())
            if not runs:
                print(f"project {args.project}: no queued run is working")
            return
        started = time.monotonic()
        api = LabelStudioAPI(
            settings.label_studio_url, settings.label_studio_api_key, Retry(attempts=max(1, args.retries))
        )
        # empty: the workers' own (their model's, or the project's fine-tuned decoder's)
        version = args.model_version or ""
        run, skipped = queued.queue_project(api, queue, args.project, options, selection, version)
        if run is None:
            print(f"project {args.project}: nothing to queue ({skipped} task(s) without an annotation)")
            return
        with queued.ctrl_c_stops_following(args.project):
            workers = queue.workers()
            print(
                f"queued {run.total} task(s) of project {args.project} as run {run.id} "
                f"({run.jobs.get('queued', 0)} job(s)); {workers} worker(s) listening",
                flush=True,
            )
            if not workers:
                print(
                    "no worker is listening yet: start `label-studio-sam2 worker` with the same REDIS_URL",
                    flush=True,
                )
            status = queued.follow(queue, run)
    except QueueUnavailable as e:
        sys.exit(f"preannotate: {e.message}")
    except (LabelStudioAPIError, ModelUnavailable) as e:
        sys.exit(f"preannotate: {e}")
    except BadRequest as e:
        sys.exit(f"preannotate: project {args.project}: {e.message}")
    print(queued.report(status, time.monotonic() - started, skipped), flush=True)
    sys.exit(1 if status.counts.get("failed") or status.finished < status.total else 0)
