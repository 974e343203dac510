"""Bulk pre-annotation: boxes to masks and automatic masks, over many tasks.

One engine (`engine.Preannotator`) serves three callers:

- "Retrieve predictions" in Label Studio (/predict without context): `retrieve.retrieve_worker`
  runs the engine while the request's deadline allows and hands the rest of the selection to the
  process's background job, which writes their predictions through the LS API.
- The CLI, `python -m backend preannotate --project ID` (`cli`): `project.run_project` over a
  whole project, pipelined, resumable, Ctrl-C safe, with retries on Label Studio errors.
- `auto_masks_entry`, automatic masks for one task of /predict.

Nothing a labeler made is touched: only predictions are written, never annotations.
"""

from backend.preannotate.cli import add_parser, cmd_preannotate
from backend.preannotate.engine import (
    Outcome,
    PreannotateOptions,
    Preannotator,
    auto_masks_entry,
    output_view,
)
from backend.preannotate.lsapi import LabelStudioAPI, LabelStudioAPIError, Retry
from backend.preannotate.project import Progress, Selection, Summary, run_project
from backend.preannotate.retrieve import BackgroundJob, background_job, retrieve_worker

__all__ = [
    "BackgroundJob",
    "LabelStudioAPI",
    "LabelStudioAPIError",
    "Outcome",
    "PreannotateOptions",
    "Preannotator",
    "Progress",
    "Retry",
    "Selection",
    "Summary",
    "add_parser",
    "auto_masks_entry",
    "background_job",
    "cmd_preannotate",
    "output_view",
    "retrieve_worker",
    "run_project",
]
