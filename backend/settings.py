"""Settings from the environment (Label Studio ML backend conventions) and the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit, urlunsplit


def without_userinfo(url: str) -> str:
    """`url` without a `user:password@` part (it would end up in messages and logs; the backend
    authenticates to Label Studio with LABEL_STUDIO_API_KEY)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.rpartition("@")[2] if "@" in url else url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class SettingsError(ValueError):
    """A setting the server must not start with; the message says what to change."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


STORE_OFF = ("off", "none", "false", "0", "no")


def default_store_dir() -> str:
    """The embedding store's home when nothing is configured: the user's cache directory
    ($XDG_CACHE_HOME, else ~/.cache) / label-studio-sam2 / embeddings."""
    from pathlib import Path

    cache = _env("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "label-studio-sam2" / "embeddings")


@dataclass
class Settings:
    model: str = "facebook/sam2.1-hiera-tiny"  # SAM2_MODEL: short name, hub id, directory or .pt
    device: str = "auto"  # DEVICE: auto | cpu | cuda | cuda:1 | mps
    label_studio_url: str | None = None  # LABEL_STUDIO_URL
    label_studio_api_key: str | None = field(default=None, repr=False)  # LABEL_STUDIO_API_KEY
    basic_auth_user: str | None = None  # BASIC_AUTH_USER
    basic_auth_pass: str | None = field(default=None, repr=False)  # BASIC_AUTH_PASS
    cache_mb: int = 1024  # EMBEDDING_CACHE_MB: in-memory embedding cache bound
    # EMBEDDING_STORE_DIR: persistent embedding store shared by workers; on by default under the
    # user's cache directory (default_store_dir()), `off` disables it (None here)
    store_dir: str | None = None
    store_gb: float = 10.0  # EMBEDDING_STORE_GB: its size bound (fp16 hiera: ~8 MB per image)
    prefetch_tasks: int = 0  # PREFETCH_TASKS: pre-encode this many next tasks in idle time (needs the store)
    prompt_memory_s: float = 300.0  # PROMPT_MEMORY_S: how long a box is remembered for later clicks
    max_image_mp: float = 120.0  # MAX_IMAGE_MP: decompression-bomb guard
    max_download_mb: int = 200  # MAX_DOWNLOAD_MB
    download_timeout_s: float = 30.0  # DOWNLOAD_TIMEOUT_S
    media_allowed_hosts: tuple[str, ...] = ()  # MEDIA_ALLOWED_HOSTS: comma-separated; empty = any
    predict_deadline_s: float = 90.0  # PREDICT_DEADLINE_S: answer before LS's 100 s timeout
    queue_size: int = 6  # QUEUE_SIZE: /predict requests per worker (running + waiting); more get 503
    max_body_mb: int = 64  # MAX_BODY_MB: request body size cap (413 above it)
    video_max_frames: int = 300  # VIDEO_MAX_FRAMES: tracked frames each way from the prompts
    retrieve_mode: str = "boxes"  # RETRIEVE_MODE: boxes | auto | none, for "Retrieve predictions"
    output: str = "auto"  # OUTPUT: auto (the config's control) | brush | polygon
    # bulk pre-annotation ("Retrieve predictions" and `python -m backend preannotate`)
    boxes_from: str = "annotation"  # BOXES_FROM: annotation | prediction: where boxes mode reads rectangles
    auto_label: str | None = None  # AUTO_LABEL: label of automatic masks (default: the control's first)
    roi_label: str | None = None  # ROI_LABEL: automatic masks only inside rectangles with this label
    points_per_side: int = 16  # POINTS_PER_SIDE: automatic-mask grid (SAM2 uses 32; 16 keeps CPUs usable)
    auto_iou_thresh: float = 0.8  # AUTO_IOU_THRESH: minimum predicted IoU of an automatic mask
    auto_stability_thresh: float = 0.92  # AUTO_STABILITY_THRESH: minimum stability score
    min_area: int = 100  # MIN_AREA: minimum automatic-mask area, pixels
    max_masks: int = 100  # AUTO_MAX_MASKS: at most this many automatic masks per image
    auto_fast: bool = False  # AUTO_FAST: skip grid points inside masks already found (fewer masks)
    polygon_tolerance: float = 1.0  # POLYGON_TOLERANCE: polygon simplification, pixels
    background_job: bool = True  # BACKGROUND_JOB: finish a too-large "Retrieve predictions" via the LS API
    # fine-tuned decoders (`python -m backend train`, Label Studio's "Start Training")
    finetune_dir: str | None = None  # SAM2_FINETUNE_DIR: versions per project (default: the user's cache)
    finetune_refresh_s: float = 30.0  # FINETUNE_REFRESH_S: how often a server looks for a new version
    finetune_epochs: int = 20  # FINETUNE_EPOCHS
    finetune_lr: float = 1e-4  # FINETUNE_LR
    finetune_min_gain: float = 0.02  # FINETUNE_MIN_GAIN: held-out mIoU gain needed to activate
    log_level: str = "INFO"  # LOG_LEVEL
    preload: bool = True  # load the model when the app starts (in a thread: /health answers at once)

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        s = cls(
            model=_env("SAM2_MODEL", cls.model),
            device=_env("DEVICE", cls.device),
            label_studio_url=(_env("LABEL_STUDIO_URL") or _env("LABEL_STUDIO_HOST") or None),
            label_studio_api_key=_env("LABEL_STUDIO_API_KEY") or _env("LABEL_STUDIO_ACCESS_TOKEN"),
            basic_auth_user=_env("BASIC_AUTH_USER"),
            basic_auth_pass=os.environ.get("BASIC_AUTH_PASS") if "BASIC_AUTH_PASS" in os.environ else None,
            cache_mb=int(_env("EMBEDDING_CACHE_MB", str(cls.cache_mb))),
            store_dir=_env("EMBEDDING_STORE_DIR") or default_store_dir(),
            store_gb=float(_env("EMBEDDING_STORE_GB", str(cls.store_gb))),
            prefetch_tasks=int(_env("PREFETCH_TASKS", str(cls.prefetch_tasks))),
            prompt_memory_s=float(_env("PROMPT_MEMORY_S", str(cls.prompt_memory_s))),
            max_image_mp=float(_env("MAX_IMAGE_MP", str(cls.max_image_mp))),
            max_download_mb=int(_env("MAX_DOWNLOAD_MB", str(cls.max_download_mb))),
            download_timeout_s=float(_env("DOWNLOAD_TIMEOUT_S", str(cls.download_timeout_s))),
            media_allowed_hosts=tuple(
                h.strip() for h in (_env("MEDIA_ALLOWED_HOSTS", "") or "").split(",") if h.strip()
            ),
            predict_deadline_s=float(_env("PREDICT_DEADLINE_S", str(cls.predict_deadline_s))),
            queue_size=int(_env("QUEUE_SIZE", str(cls.queue_size))),
            max_body_mb=int(_env("MAX_BODY_MB", str(cls.max_body_mb))),
            video_max_frames=int(_env("VIDEO_MAX_FRAMES", str(cls.video_max_frames))),
            retrieve_mode=_env("RETRIEVE_MODE", cls.retrieve_mode),
            output=_env("OUTPUT", cls.output),
            boxes_from=_env("BOXES_FROM", cls.boxes_from),
            auto_label=_env("AUTO_LABEL"),
            roi_label=_env("ROI_LABEL"),
            points_per_side=int(_env("POINTS_PER_SIDE", str(cls.points_per_side))),
            auto_iou_thresh=float(_env("AUTO_IOU_THRESH", str(cls.auto_iou_thresh))),
            auto_stability_thresh=float(_env("AUTO_STABILITY_THRESH", str(cls.auto_stability_thresh))),
            min_area=int(_env("MIN_AREA", str(cls.min_area))),
            max_masks=int(_env("AUTO_MAX_MASKS", str(cls.max_masks))),
            auto_fast=_env("AUTO_FAST", "false").lower() in ("1", "true", "yes", "on"),
            polygon_tolerance=float(_env("POLYGON_TOLERANCE", str(cls.polygon_tolerance))),
            background_job=_env("BACKGROUND_JOB", "true").lower() not in ("0", "false", "no", "off"),
            finetune_dir=_env("SAM2_FINETUNE_DIR"),
            finetune_refresh_s=float(_env("FINETUNE_REFRESH_S", str(cls.finetune_refresh_s))),
            finetune_epochs=int(_env("FINETUNE_EPOCHS", str(cls.finetune_epochs))),
            finetune_lr=float(_env("FINETUNE_LR", str(cls.finetune_lr))),
            finetune_min_gain=float(_env("FINETUNE_MIN_GAIN", str(cls.finetune_min_gain))),
            log_level=_env("LOG_LEVEL", cls.log_level),
        )
        names = {f.name for f in fields(cls)}
        for k, v in overrides.items():
            if k not in names:
                raise TypeError(f"unknown setting {k}")
            if v is not None:
                setattr(s, k, v)
        if s.label_studio_url:
            s.label_studio_url = without_userinfo(s.label_studio_url).rstrip("/")
        if s.store_dir is not None and s.store_dir.strip().lower() in STORE_OFF:
            s.store_dir = None
        s.check()
        return s

    def check(self) -> None:
        """Refuse settings that would leave the server open by mistake (auth fails closed)."""
        user, password = self.basic_auth_user, self.basic_auth_pass
        if (user and password is None) or (not user and password):
            raise SettingsError(
                "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (or neither, for a backend "
                f"only Label Studio can reach); only {'BASIC_AUTH_USER' if user else 'BASIC_AUTH_PASS'} is set"
            )
        if user and not password.strip():
            raise SettingsError("BASIC_AUTH_PASS is empty: set a password (e.g. `openssl rand -hex 20`)")
