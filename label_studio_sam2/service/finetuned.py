"""The server side of fine-tuning: per-project segmenters, and training started by Label Studio.

`ProjectSegmenters` gives each project the segmenter of its active fine-tuned decoder
(`label_studio_sam2.engine.finetuned_decoders.ProjectDecoders`: one shared encoder, the same embedding cache and store) with
its own model_version, or the base segmenter. `TrainingLauncher` answers Label Studio's
START_TRAINING webhook (the "Start Training" button, or every Nth annotation when the project's
"start training on annotation submission" is set) by running `label-studio-sam2 train` for that
project in the background, at low CPU priority, one run per project at a time and at most
MAX_TRAININGS at once (`label_studio_sam2.service.trainlock`: file locks, so across gunicorn workers and the CLI),
each child reaped when it ends, its log (train.log) readable by this user only; the server picks
the new version up on its next look (FINETUNE_REFRESH_S). It answers with the run's job id and,
when the run ends, logs what it decided (`label_studio_sam2.service.trainruns.summary`: held-out scores, the version
and where it was written, or why it failed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from label_studio_sam2.engine.finetuned_decoders import DecoderVersions, ProjectDecoders, model_version
from label_studio_sam2.engine.image import ImagePredictor
from label_studio_sam2.service.errors import BadRequest
from label_studio_sam2.service.handoff import child_env, spawn
from label_studio_sam2.service.segment import ImageSegmenter
from label_studio_sam2.service.settings import Settings
from label_studio_sam2.service.trainlock import TrainingBusy, check_free
from label_studio_sam2.service.trainruns import read_runs, summary

log = logging.getLogger("label_studio_sam2.service.train")


class ProjectSegmenters:
    def __init__(self, base, settings: Settings):
        self.base = base  # label_studio_sam2.service.segment.ImageSegmenter of the base model
        self.decoders = ProjectDecoders(
            base.predictor.loaded, settings.finetune_dir, settings.finetune_refresh_s
        )
        self._lock = threading.Lock()
        self._made: dict[int, tuple[str, object]] = {}

    def get(self, project: int | None):
        """The segmenter for a project (an int id, or None for "unknown": the base)."""
        loaded, version = self.decoders.get(project)
        if version is None:
            return self.base
        with self._lock:
            made = self._made.get(project)
            if made is None or made[0] != version:
                base = self.base.predictor
                # same keys: embeddings stay valid
                predictor = ImagePredictor(loaded, base.cache, base.store, decode_batch=base.decode_batch)
                predictor.on_timing = base.on_timing
                segmenter = ImageSegmenter(
                    predictor,
                    self.base.media,
                    model_version(self.base.model_version, project, version),
                    self.base.memory,
                    self.base.max_regions,
                )
                made = self._made[project] = (version, segmenter)
            return made[1]


TRAIN_PRIORITY = 10  # clicks come first; training takes the CPU time they leave


class TrainingLauncher:
    """Runs `label-studio-sam2 train --project ID` in the background, one per project."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._running: dict[int, subprocess.Popen] = {}

    def start(self, project: int, model_source: str) -> dict:
        """Start a run of `project`; {"status": "already training"} if one runs (here, in another
        worker, or the CLI); TrainingBusy (429) when MAX_TRAININGS runs are going."""
        s = self.settings
        if not (s.label_studio_url and s.label_studio_api_key):
            raise BadRequest(
                "training reads the project's annotations through the Label Studio API: "
                "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the backend"
            )
        with self._lock:
            proc = self._running.get(project)
            if proc is not None and proc.poll() is None:
                return {"status": "already training", "job": f"train-{project}-{proc.pid}"}
            self._running = {p: c for p, c in self._running.items() if c.poll() is None}
            if len(self._running) >= s.max_trainings:  # started here, not yet holding their locks
                raise TrainingBusy(
                    f"{len(self._running)} training run(s) already running here "
                    f"(MAX_TRAININGS={s.max_trainings}): start this one when one ends, or raise MAX_TRAININGS",
                    project_busy=False,
                )
            versions = DecoderVersions(s.finetune_dir, project)
            try:  # runs of other processes (workers, the CLI) hold file locks: the run takes them
                check_free(versions.dir.parent, project, s.max_trainings)
            except TrainingBusy as e:
                if e.project_busy:
                    log.info("project %s: %s", project, e.message)
                    return {"status": "already training", "job": f"train-{project}", "detail": e.message}
                raise
            versions.dir.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "label_studio_sam2",
                "train",
                "--project",
                str(project),
                "--model",
                model_source,
            ]
            cmd += ["--device", s.device, "--epochs", str(s.finetune_epochs), "--lr", str(s.finetune_lr)]
            cmd += ["--min-gain", str(s.finetune_min_gain), "--dir", str(versions.dir.parent)]
            log_path = Path(versions.dir) / "train.log"
            out = private_append(log_path)  # the run's log: only this user reads it
            try:  # the server's effective settings as environment (the token never in argv)
                proc = spawn(
                    cmd,
                    child_env(s, model=model_source),
                    niceness=TRAIN_PRIORITY,
                    stdout=out,  # waited for as it ends (never <defunct>), then what it decided is logged
                    on_exit=lambda p: self._report(project, p, versions.dir, log_path),
                )
            finally:
                os.close(out)
            self._running[project] = proc
        log.info(
            "project %s: fine-tuning started in the background (pid %d, log %s)", project, proc.pid, log_path
        )
        return {"status": "training", "job": f"train-{project}-{proc.pid}"}

    def _report(self, project: int, proc: subprocess.Popen, project_dir: Path, log_path: Path) -> None:
        """Wait for a run to end, then log what it decided (WARNING when it failed)."""
        code = proc.wait()
        run = next((r for r in read_runs(project_dir) if r.get("pid") == proc.pid), None)
        if run is not None and run.get("state") != "running":
            failed = run.get("state") != "finished"
            log.log(
                logging.WARNING if failed else logging.INFO, "%s (log %s)", summary(project, run), log_path
            )
            return
        log.warning(
            "project %s: fine-tuning ended with exit code %s before it recorded a result: %s (log %s)",
            project,
            code,
            _last_line(log_path) or "no output",
            log_path,
        )

    def wait(self, project: int, timeout_s: float | None = None) -> int | None:
        proc = self._running.get(project)
        return None if proc is None else proc.wait(timeout_s)


def private_append(path: Path) -> int:
    """An fd appending to `path`, created (or made) readable by this user only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with contextlib.suppress(OSError):  # not ours to change: it stays as it was
        os.fchmod(fd, 0o600)  # a log an older version made 0644
    return fd


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""
