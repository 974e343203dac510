"""`python -m backend preannotate --project ID [--mode boxes|auto] ...`"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from backend.cli_options import add_label_studio_options, add_model_options, stop_on_signals
from backend.errors import BadRequest
from backend.jobqueue import JobQueue, QueueUnavailable
from backend.logs import setup_logging
from backend.preannotate import queued
from backend.preannotate.engine import MODES, OUTPUTS, SOURCES, PreannotateOptions, Preannotator
from backend.preannotate.lsapi import LabelStudioAPI, LabelStudioAPIError, Retry, describe
from backend.preannotate.project import Selection, run_project
from backend.protocol import parse_label_config
from backend.runtime import Runtime
from backend.settings import Settings
from sam2.models import load_image_model, set_cpu_threads
from sam2.releases import ModelUnavailable

log = logging.getLogger("backend.preannotate")


def _task_ids(text: str) -> frozenset[int]:
    """ "1,2,10-12" -> {1, 2, 10, 11, 12}."""
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            ids.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"task ids look like 1,2,10-12, got {text!r}") from None
    return frozenset(ids)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "preannotate",
        help="pre-annotate a whole Label Studio project (writes predictions only; resumable)",
        description="Boxes to masks (a mask per rectangle of the latest annotation) or automatic masks "
        "for every task of a project, written to Label Studio as predictions. Tasks that already have "
        "a prediction of this model version are skipped, so an interrupted run continues where it "
        "stopped. Label Studio: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --url / --api-key).",
    )
    p.add_argument("--project", type=int, required=True, help="project id (required)")
    p.add_argument("--mode", choices=MODES, default=None, help="boxes (default) | auto (RETRIEVE_MODE)")
    p.add_argument(
        "--from",
        dest="boxes_from",
        choices=SOURCES,
        default=None,
        help="rectangles of the latest annotation (default) or prediction (BOXES_FROM)",
    )
    p.add_argument(
        "--output",
        choices=OUTPUTS,
        default=None,
        help="auto: the config's BrushLabels, else PolygonLabels | brush | polygon (default: OUTPUT, else auto)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="polygon simplification in pixels (default: POLYGON_TOLERANCE, else 1)",
    )
    p.add_argument(
        "--label",
        default=None,
        help="label of automatic masks (default: AUTO_LABEL, else the output control's first label)",
    )
    p.add_argument(
        "--roi-label",
        default=None,
        help="automatic masks only inside rectangles with this label (default: ROI_LABEL, else the whole image)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        default=None,
        help="automatic masks, fast mode: coarse grid first, finer points only where it found something (default: AUTO_FAST, else off; a few masks fewer)",
    )
    p.add_argument(
        "--points-per-side",
        type=int,
        default=None,
        help="automatic-mask grid (default: POINTS_PER_SIDE, else 16)",
    )
    p.add_argument(
        "--min-area",
        type=int,
        default=None,
        help="smallest automatic mask in pixels (default: MIN_AREA, else 100)",
    )
    p.add_argument(
        "--iou-thresh",
        type=float,
        default=None,
        help="minimum predicted IoU (default: AUTO_IOU_THRESH, else 0.8)",
    )
    p.add_argument(
        "--stability-thresh",
        type=float,
        default=None,
        help="minimum stability (default: AUTO_STABILITY_THRESH, else 0.92)",
    )
    p.add_argument(
        "--max-masks",
        type=int,
        default=None,
        help="automatic masks per image at most (default: AUTO_MAX_MASKS, else 100)",
    )
    p.add_argument(
        "--filter",
        default="all",
        help="all (default) | annotated | unannotated | Data Manager filters as JSON, "
        'e.g. \'{"conjunction":"and","items":[{"filter":"filter:tasks:total_annotations",'
        '"operator":"greater","type":"Number","value":0}]}\'',
    )
    p.add_argument(
        "--view",
        type=int,
        default=None,
        help="only the tasks of this Data Manager tab (view id; default: no tab)",
    )
    p.add_argument(
        "--tasks", type=_task_ids, default=None, help="only these task ids: 1,2,10-12 (default: every task)"
    )
    add_model_options(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--model-version",
        default=None,
        help="model_version of the predictions (default: the backend's, so "
        "Label Studio's Retrieve predictions skips what this run did, and the other way round)",
    )
    p.add_argument("--prefetch", type=int, default=2, help="tasks downloaded ahead (default 2)")
    p.add_argument("--retries", type=int, default=5, help="attempts per Label Studio call (default 5)")
    add_label_studio_options(p)
    queued = p.add_mutually_exclusive_group()
    queued.add_argument(
        "--queue",
        action="store_true",
        help="queue the selection for `python -m backend worker` processes (REDIS_URL) and follow "
        "its progress; Ctrl-C stops following, not the jobs",
    )
    queued.add_argument("--status", action="store_true", help="the project's queued runs (REDIS_URL)")
    queued.add_argument(
        "--cancel", action="store_true", help="cancel the project's queued runs still working (REDIS_URL)"
    )
    p.set_defaults(fn=cmd_preannotate)


def cmd_preannotate(args) -> None:
    settings = Settings.from_env(
        model=args.model, device=args.device, label_studio_url=args.url, label_studio_api_key=args.api_key
    )
    setup_logging(settings.log_level)
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
        loaded = load_image_model(settings.model, settings.device, settings.cpu_precision)
    except (LabelStudioAPIError, ModelUnavailable) as e:
        sys.exit(f"preannotate: {e}")
    except BadRequest as e:
        sys.exit(f"preannotate: project {args.project}: {e.message}")
    except Exception as e:  # the SDK refuses an expired token while constructing
        sys.exit(f"preannotate: cannot use Label Studio at {settings.label_studio_url}: {describe(e)}")
    runtime = Runtime(settings, loaded=loaded)
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
    queue = JobQueue(settings.redis_url, settings.queue_chunk_tasks)
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
                    "no worker is listening yet: start `python -m backend worker` with the same REDIS_URL",
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
