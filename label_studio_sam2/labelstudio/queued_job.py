"""`preannotate --queue | --status | --cancel`: a project's pre-annotation through the job queue.

`--queue` selects the tasks (as the in-process run does), queues them as one run of chunked jobs
(`label_studio_sam2.service.jobqueue`) for `label-studio-sam2 worker` processes, and follows the run's progress,
counted in Redis, with a bar until every task has an outcome. Ctrl-C stops following, never the
jobs. `--status` prints the project's latest runs; `--cancel` cancels the ones still working.
No model is loaded here.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

from label_studio_sam2.labelstudio.api import LabelStudioAPI
from label_studio_sam2.labelstudio.bulk import Preannotator
from label_studio_sam2.labelstudio.project_job import Progress, Selection, duration, select_tasks
from label_studio_sam2.labelstudio.protocol import parse_label_config
from label_studio_sam2.service.bulk import PreannotateOptions
from label_studio_sam2.service.jobqueue import JobQueue, RunStatus

log = logging.getLogger("label_studio_sam2.bulk")


def queue_project(
    api: LabelStudioAPI,
    queue: JobQueue,
    project_id: int,
    options: PreannotateOptions,
    selection: Selection,
    model_version: str,
) -> tuple[RunStatus | None, int]:
    """Queue the selection as one run; returns it (None when nothing is left to do) and the
    number of tasks skipped without a look (no annotation). Raises BadRequest for a label config
    these options cannot use, QueueUnavailable when Redis is down."""
    xml = api.label_config(project_id)
    Preannotator(None, options).check(parse_label_config(xml))
    queue.workers()  # Redis down: say so before listing thousands of tasks
    summary, todo = select_tasks(api, project_id, selection, options)
    skipped = sum(summary.skipped.values())
    if not todo:
        return None, skipped
    run = queue.start_run(
        [b["id"] for b in todo],
        project=project_id,
        label_config=xml,
        options=asdict(options),
        model_version=model_version,
        source="preannotate",
    )
    return run, skipped


def follow(queue: JobQueue, run: RunStatus, poll_s: float = 1.0, progress=None) -> RunStatus:
    """Show the run's progress until every task has an outcome or no job of it is left waiting
    or running (a job failed for good, or the run was cancelled). Ctrl-C raises
    KeyboardInterrupt; the jobs go on."""
    bar = (progress or Progress)(run.total)
    try:
        while True:
            status = queue.status(run.id) or run
            bar.show(status.finished, {k: status.counts.get(k, 0) for k in ("done", "skipped", "failed")})
            if status.finished >= status.total or not status.active:
                return status
            time.sleep(poll_s)
    finally:
        bar.close()


@contextlib.contextmanager
def ctrl_c_stops_following(project_id: int) -> Iterator[None]:
    """Around a command line's `follow`: Ctrl-C stops following (exit 130), never the jobs. It
    does so also where SIGINT came in ignored (a job started in the background by a
    non-interactive shell), where Python installs no KeyboardInterrupt handler of its own."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the jobs go on. `preannotate --project {project_id} --status` "
            "shows their progress, `--cancel` stops them",
            flush=True,
        )
        raise SystemExit(130) from None


def report(status: RunStatus, seconds: float, skipped_before: int) -> str:
    c = status.counts
    lines = [
        f"finished after {duration(seconds)}: {status.total + skipped_before} task(s) selected, "
        f"{c.get('done', 0)} predicted, {c.get('skipped', 0) + skipped_before} skipped, {c.get('failed', 0)} failed"
    ]
    if status.finished < status.total:
        jobs = ", ".join(f"{n} {s}" for s, n in sorted(status.jobs.items())) or "none"
        lines.append(
            f"  {status.total - status.finished} task(s) not processed: "
            + ("the run was cancelled" if status.cancelled else f"jobs: {jobs}")
        )
    skipped = Counter(status.why.get("skipped", {}))
    if skipped_before:
        skipped["no annotation"] += skipped_before
    for reason, n in skipped.most_common():  # as the in-process run says them
        lines.append(f"  skipped {n}: {reason}")
    for reason, n in Counter(status.why.get("failed", {})).most_common():
        lines.append(f"  failed {n}: {reason}")
    return "\n".join(lines)


def print_status(queue: JobQueue, project_id: int) -> None:
    runs = queue.runs(project_id)
    if not runs:
        print(f"project {project_id}: no queued run in the last week")
    for status in runs:
        print(status.line())
    print(f"workers listening: {queue.workers()}")
