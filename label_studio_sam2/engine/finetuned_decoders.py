"""Fine-tuned decoders on disk, per project, and the server's view of them.

Layout under the root (the caller's: the service passes SAM2_FINETUNE_DIR, default
~/.cache/label-studio-sam2/finetuned, so the server and the CLI find the same place without
configuration; here, without a root, ~/.cache/label-studio-sam2/finetuned):

    project-<id>/v0001/decoder.safetensors   prompt encoder + mask decoder weights
    project-<id>/v0001/manifest.json         base model, project, data size, metrics, date
    project-<id>/active.json                 {"version": "v0002", "history": ["v0001", "v0002"]}
    project-<id>/checkpoint.pt               an interrupted fine-tune (resumed by the next run)

Every version is kept; only an activated one is served. `rollback` returns to the version
activated before the current one (or the base model). `ProjectDecoders` gives the server each
project's active decoder as a view of the loaded model that shares its image encoder; it looks at
`active.json` again at most every `refresh_s` seconds, so a running server picks up a new
version within that time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from label_studio_sam2.engine.finetune import decoder_state, view_of, with_decoder
from label_studio_sam2.engine.models import LoadedModel

log = logging.getLogger(__name__)

WEIGHTS = "decoder.safetensors"
MANIFEST = "manifest.json"
ACTIVE = "active.json"
_VERSION = re.compile(r"^v\d{4,}$")


def default_root() -> Path:
    """~/.cache/label-studio-sam2/finetuned, when the caller names no root (the engine reads no
    environment: the service passes Settings.finetune_dir, which honours XDG_CACHE_HOME)."""
    return Path.home() / ".cache" / "label-studio-sam2" / "finetuned"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class DecoderVersions:
    """The versions of one project's fine-tuned decoder."""

    def __init__(self, root: str | os.PathLike | None, project: int):
        self.project = int(project)
        self.dir = Path(root or default_root()) / f"project-{self.project}"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint.pt"

    def versions(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(
            p.name for p in self.dir.iterdir() if _VERSION.match(p.name) and (p / MANIFEST).is_file()
        )

    def manifest(self, version: str) -> dict:
        return json.loads((self.dir / version / MANIFEST).read_text())

    def _active(self) -> dict:
        try:
            data = json.loads((self.dir / ACTIVE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def active(self) -> str | None:
        """The served version, or None for the base model."""
        v = self._active().get("version")
        return v if isinstance(v, str) and _VERSION.match(v) and (self.dir / v / WEIGHTS).is_file() else None

    def save(self, state: dict[str, torch.Tensor], manifest: dict) -> str:
        """Write a new version (not yet active); returns its name."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        existing = [int(v[1:]) for v in self.versions()]
        number = max(existing, default=0) + 1
        while True:  # another process may take the same number: mkdir decides
            version = f"v{number:04d}"
            try:
                (self.dir / version).mkdir()
                break
            except FileExistsError:
                number += 1
        out = self.dir / version
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / WEIGHTS))
        full = {
            **manifest,
            "project": self.project,
            "version": version,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _atomic_write(out / MANIFEST, json.dumps(full, indent=2) + "\n")
        return version

    def activate(self, version: str) -> None:
        if version not in self.versions():
            raise ValueError(f"project {self.project} has no version {version!r} (has {self.versions()})")
        history = [v for v in self._active().get("history", []) if v != version] + [version]
        _atomic_write(self.dir / ACTIVE, json.dumps({"version": version, "history": history}) + "\n")

    def rollback(self) -> str | None:
        """Serve the version activated before the current one (None: the base model)."""
        history = [v for v in self._active().get("history", []) if (self.dir / v / WEIGHTS).is_file()]
        if history and history[-1] == self.active():
            history.pop()
        previous = history[-1] if history else None
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / ACTIVE, json.dumps({"version": previous, "history": history}) + "\n")
        return previous

    def load(self, version: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.dir / version / WEIGHTS))


def model_version(base_version: str, project: int, version: str | None) -> str:
    """What Label Studio stores with a prediction: the base's, or the base's plus the fine-tune."""
    return base_version if version is None else f"{base_version}-p{project}-{version}"


class ProjectDecoders:
    """Each project's active decoder over one shared base model (its encoder held once)."""

    def __init__(self, base: LoadedModel, root: str | os.PathLike | None = None, refresh_s: float = 30.0):
        self.base = base
        self.root = Path(root or default_root())
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[float, str | None, LoadedModel | None]] = {}  # checked at, version, model

    def get(self, project: int | None) -> tuple[LoadedModel, str | None]:
        """(the model to decode with, its fine-tuned version or None for the base)."""
        if project is None:
            return self.base, None
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(project)
            if seen is not None and now - seen[0] < self.refresh_s:
                return (seen[2] or self.base), seen[1]
        versions = DecoderVersions(self.root, project)
        version = versions.active()
        loaded = None
        if seen is not None and seen[1] == version:
            loaded = seen[2]
        elif version is not None:
            loaded = self._load(versions, version)
            if loaded is None:
                version = None
        with self._lock:
            self._seen[project] = (now, version, loaded)
        return (loaded or self.base), version

    def _load(self, versions: DecoderVersions, version: str) -> LoadedModel | None:
        try:
            manifest = versions.manifest(version)
            if manifest.get("base_model") != self.base.model_id:
                log.warning(
                    "project %s: fine-tuned %s was trained from %s, not the served %s: serving the base model",
                    versions.project,
                    version,
                    manifest.get("base_model"),
                    self.base.model_id,
                )
                return None
            state = versions.load(version)
            model = with_decoder(self.base.model, state).to(self.base.device).eval()
        except Exception as e:  # a damaged or planted file (SafetensorError...): never a 500
            log.warning(
                "project %s: cannot load fine-tuned %s (%s): serving the base model",
                versions.project,
                version,
                e,
            )
            return None
        log.info("project %s: serving fine-tuned decoder %s", versions.project, version)
        return view_of(self.base, model)


__all__ = ["DecoderVersions", "ProjectDecoders", "default_root", "model_version", "decoder_state"]
