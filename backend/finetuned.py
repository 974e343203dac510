"""The server side of fine-tuning: per-project segmenters, and training started by Label Studio.

`ProjectSegmenters` gives each project the segmenter of its active fine-tuned decoder
(`sam2.decoders.ProjectDecoders`: one shared encoder, the same embedding cache and store) with
its own model_version, or the base segmenter. `TrainingLauncher` answers Label Studio's
START_TRAINING webhook (the "Start Training" button, or every Nth annotation when the project's
"start training on annotation submission" is set) by running `python -m backend train` for that
project in the background, at low CPU priority, one run per project at a time; the server picks
the new version up on its next look (FINETUNE_REFRESH_S).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from backend.errors import BadRequest
from backend.segment import ImageSegmenter
from backend.settings import Settings
from sam2.decoders import DecoderVersions, ProjectDecoders, model_version
from sam2.image import ImagePredictor

log = logging.getLogger("backend.train")


class ProjectSegmenters:
    def __init__(self, base, settings: Settings):
        self.base = base  # backend.segment.ImageSegmenter of the base model
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
                predictor = ImagePredictor(loaded, base.cache, base.store)  # same keys: embeddings stay valid
                predictor.on_timing = base.on_timing
                segmenter = ImageSegmenter(
                    predictor,
                    self.base.media,
                    model_version(self.base.model_version, project, version),
                    self.base.memory,
                )
                made = self._made[project] = (version, segmenter)
            return made[1]


MAX_ID_DIGITS = 18  # Label Studio's ids are 64-bit; 18 digits always fit one (and a file name)
_ID = re.compile(f"[0-9]{{1,{MAX_ID_DIGITS}}}")


def project_id(value) -> int | None:
    """Label Studio's project field ("12.1700000000" in /predict and /setup, 12 or {"id": 12} in
    webhooks) as an int: the one place a request's project id is parsed. None when there is none
    (missing or empty); BadRequest (400) for anything else that is not a positive id of ASCII
    digits, at most MAX_ID_DIGITS of them ("²" is a digit to str.isdigit, not to int)."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or value == "":
        return None
    if type(value) is int:
        number = value if 0 < value < 10**MAX_ID_DIGITS else None
    elif isinstance(value, str) and _ID.fullmatch(value.split(".")[0]):
        number = int(value.split(".")[0]) or None
    else:
        number = None
    if number is None:
        raise BadRequest(
            f"project {str(value)[:40]!r} is not a Label Studio project id "
            f"(a positive integer, ASCII digits, at most {MAX_ID_DIGITS})"
        )
    return number


class TrainingLauncher:
    """Runs `python -m backend train --project ID` in the background, one per project."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._running: dict[int, subprocess.Popen] = {}

    def start(self, project: int, model_source: str) -> dict:
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
            versions = DecoderVersions(s.finetune_dir, project)
            versions.dir.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "backend",
                "train",
                "--project",
                str(project),
                "--model",
                model_source,
            ]
            cmd += ["--device", s.device, "--epochs", str(s.finetune_epochs), "--lr", str(s.finetune_lr)]
            cmd += ["--min-gain", str(s.finetune_min_gain), "--dir", str(versions.dir.parent)]
            env = dict(os.environ)
            env.update(LABEL_STUDIO_URL=s.label_studio_url, LABEL_STUDIO_API_KEY=s.label_studio_api_key)
            if s.store_dir:
                env["EMBEDDING_STORE_DIR"] = s.store_dir
            log_path = Path(versions.dir) / "train.log"
            with log_path.open("ab") as out:
                proc = subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_low_priority,
                )
            self._running[project] = proc
        log.info(
            "project %s: fine-tuning started in the background (pid %d, log %s)", project, proc.pid, log_path
        )
        return {"status": "training", "job": f"train-{project}-{proc.pid}"}

    def wait(self, project: int, timeout_s: float | None = None) -> int | None:
        proc = self._running.get(project)
        return None if proc is None else proc.wait(timeout_s)


def _low_priority() -> None:
    os.nice(10)  # clicks come first; training takes the CPU time they leave
