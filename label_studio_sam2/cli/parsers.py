"""The parsers of `preannotate`, `warm`, `train` and `worker`, without their code.

Those commands' modules load torch (through label_studio_sam2.service.runtime and sam2), which takes seconds: this
module imports only argparse and light modules, so `label-studio-sam2 COMMAND --help`, and a
command line with a mistake in it, answer at once. Each parser's entry point is `lazy`: the
command's module is imported when the command runs, not before.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from label_studio_sam2.cli.options import add_label_studio_options, add_model_options
from label_studio_sam2.service.bulk_options import MODES, OUTPUTS, SOURCES


def lazy(target: str) -> Callable[[argparse.Namespace], None]:
    """The entry point `"module:function"`, imported only when the command runs."""
    module, _, name = target.partition(":")

    def run(args: argparse.Namespace) -> None:
        return getattr(importlib.import_module(module), name)(args)

    run.__qualname__ = run.__name__ = f"lazy({target})"
    run.target = target  # type: ignore[attr-defined]
    return run


def task_ids(text: str) -> frozenset[int]:
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


def add_preannotate_parser(subparsers) -> None:
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
        "--tasks", type=task_ids, default=None, help="only these task ids: 1,2,10-12 (default: every task)"
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
        help="queue the selection for `label-studio-sam2 worker` processes (REDIS_URL) and follow "
        "its progress; Ctrl-C stops following, not the jobs",
    )
    queued.add_argument("--status", action="store_true", help="the project's queued runs (REDIS_URL)")
    queued.add_argument(
        "--cancel", action="store_true", help="cancel the project's queued runs still working (REDIS_URL)"
    )
    p.set_defaults(fn=lazy("label_studio_sam2.cli.preannotate:cmd_preannotate"))


def add_warm_parser(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser(
        "warm",
        help="pre-encode a project's images into the embedding store (EMBEDDING_STORE_DIR)",
        description="Encode every image of a Label Studio project into the persistent embedding store, "
        "so a labeler's first click on it only runs the mask decoder. Resumable: images already "
        "stored are skipped. Label Studio: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --url / "
        "--api-key). With --model-only, only load the model as the server would: weights fetched or "
        "converted, and the image encoder converted for OpenVINO (ENCODER_RUNTIME), so the server's "
        "first start does not wait for it.",
    )
    which = w.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--project", type=int, default=None, help="project id (required, no default, unless --model-only)"
    )
    which.add_argument(
        "--model-only",
        action="store_true",
        help="prepare the model and its converted encoder (in the store's folder's openvino/) and exit; "
        "no Label Studio needed",
    )
    w.add_argument("--store", default=None, help="store directory (default: EMBEDDING_STORE_DIR)")
    add_model_options(w)
    w.add_argument(
        "--after-task", type=int, default=None, help="only tasks with a larger id (default: from the first)"
    )
    w.add_argument("--limit", type=int, default=None, help="at most this many tasks (default: all)")
    w.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    w.add_argument(
        "--queue",
        action="store_true",
        help="queue the images for `label-studio-sam2 worker` processes (REDIS_URL) and follow them; "
        "the workers encode into their store",
    )
    add_label_studio_options(w)
    w.set_defaults(fn=lazy("label_studio_sam2.cli.warm:cmd_warm"))


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="fine-tune the mask decoder on a project's corrected masks (activated only if it improves)",
        description="Fine-tune a project's decoder on its own corrected masks: "
        "`label-studio-sam2 train --project ID`.",
    )
    t.add_argument("--project", type=int, required=True, help="project id")
    add_model_options(t)  # the served model: fine-tuning starts from its weights
    add_label_studio_options(t)
    t.add_argument(
        "--store", default=None, help="embedding store to read and fill (default: EMBEDDING_STORE_DIR)"
    )
    t.add_argument(
        "--dir",
        default=None,
        help="where versions live (default: SAM2_FINETUNE_DIR, else ~/.cache/label-studio-sam2/finetuned)",
    )
    t.add_argument("--epochs", type=int, default=None, help="epochs (default: FINETUNE_EPOCHS, else 20)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: FINETUNE_LR, else 1e-4)")
    t.add_argument(
        "--min-gain",
        type=float,
        default=None,
        help="held-out mIoU gain needed to activate (default: FINETUNE_MIN_GAIN, else 0.02)",
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of tasks held out for the before/after scores (default: 0.2)",
    )
    t.add_argument(
        "--rollback",
        action="store_true",
        help="serve the previously activated version again (default: off)",
    )
    t.add_argument(
        "--list", action="store_true", help="list the project's versions and their scores (default: off)"
    )
    t.add_argument(
        "--status",
        action="store_true",
        help="show the project's running and last fine-tuning runs: started, scores, outcome (default: off)",
    )
    t.set_defaults(fn=lazy("label_studio_sam2.cli.train:cmd_train"))


def add_worker_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "worker",
        help="process queued work (REDIS_URL): Retrieve overflow, `preannotate --queue`",
        description="An RQ worker for the job queue in REDIS_URL: loads the model once and keeps it "
        "for every job (no fork, no reload), predicts the queued chunks of tasks and writes their "
        "predictions to Label Studio (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY). Run one per GPU "
        "(--device cuda:N), on any machine that reaches Redis and Label Studio. SIGTERM finishes "
        "the current task and hands the rest of its chunk back; a killed worker's chunk is "
        "requeued within 2 x JOB_LEASE_S.",
    )
    add_model_options(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--name", default=None, help="worker name in Redis and /metrics (default: host.pid.device)"
    )
    p.add_argument(
        "--burst", action="store_true", help="exit once the queue is empty (default: keep listening)"
    )
    add_label_studio_options(p)
    p.set_defaults(fn=lazy("label_studio_sam2.cli.worker:cmd_worker"))


# in the order `label-studio-sam2 --help` lists them, after serve, make-test-model and convert
ADD_PARSERS = (add_preannotate_parser, add_warm_parser, add_train_parser, add_worker_parser)
