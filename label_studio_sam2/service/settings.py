"""Every setting of the backend, read from the environment once, typed and validated.

One class for the server, the CLIs (`label-studio-sam2 ...`) and deploy/gunicorn.conf.py. A value
that does not parse or is out of range (a misspelt RETRIEVE_MODE, a negative size, a word in a
number field) stops start-up with a `SettingsError` naming the variable. An empty variable counts
as unset. The table of environment variables in docs/configuration.md is `env_table()` (a test keeps them equal).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


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


log = logging.getLogger("label_studio_sam2")

# Renamed variables: the old name still works (a warning names the new one); the new one wins.
DEPRECATED_NAMES = {"QUEUE_SIZE": "ADMISSION_QUEUE_SIZE", "QUEUE_CHUNK_TASKS": "JOB_CHUNK_TASKS"}

STORE_OFF = ("off", "none", "false", "0", "no")  # EMBEDDING_STORE_DIR values that disable the store


def cache_home() -> Path:
    """The project's directory in the user's cache: $XDG_CACHE_HOME (else ~/.cache) /
    label-studio-sam2. The defaults of the store, converted checkpoints, OpenVINO encoders and
    fine-tuned decoders live under it (the engine reads no environment: it is given these)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "label-studio-sam2"


def default_store_dir() -> str:
    """The embedding store's home when nothing is configured: cache_home() / embeddings."""
    return str(cache_home() / "embeddings")


# The tiny SAM2 trained on synthetic shapes: part of the source checkout's development kit, not of
# the Docker image (which holds only the label_studio_sam2 package).
CHECKOUT = Path(__file__).resolve().parents[2]  # the source checkout, when run from one
TEST_MODEL_FIXTURE = CHECKOUT / "devkit" / "sam2-shapes"
# where `make run MODEL=test` copies it (tools/demo.py: RUN_DIR/test-model) and serves it from
DEMO_TEST_MODEL = CHECKOUT / ".run" / "test-model"


def test_model_dir() -> str:
    """What the model name `test` means: the demo's copy of the tiny trained SAM2 when `make run
    MODEL=test` wrote one (so `train`, `warm`, ... find the model the demo serves, same identity),
    else the development kit's own copy."""
    if (DEMO_TEST_MODEL / "config.json").is_file():
        return str(DEMO_TEST_MODEL)
    if (TEST_MODEL_FIXTURE / "config.json").is_file():
        return str(TEST_MODEL_FIXTURE)
    raise ValueError(
        "`test` is the tiny SAM2 of a source checkout's devkit/ (not in the Docker image): run from a "
        "checkout, or write one with `label-studio-sam2 make-test-model DIR --trained` and pass DIR"
    )


def inherited_environment() -> dict[str, str]:
    """This process's environment as a child inherits it (PATH, HOME, ...): the one read of the
    whole environment, here beside the settings; `service.handoff.child_env` then replaces every
    setting in it by the server's effective value."""
    return dict(os.environ)


class SettingsError(ValueError):
    """A setting the server must not start with (invalid, out of range, or leaving it open by
    mistake); the message names the variable and says what to change."""


def _env(*names: str, **kw):
    """A field read from the environment variable `names[0]` (the others are aliases)."""
    return Field(validation_alias=AliasChoices(*names), **kw)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_ignore_empty=True, validate_by_name=True, validate_by_alias=True, extra="forbid"
    )

    # --- the model --------------------------------------------------------------------------------
    model: str = _env(
        "SAM2_MODEL",
        default="facebook/sam2.1-hiera-tiny",
        description="short name (`tiny`, `sam2.1-small`, `sam2-base-plus`, `sam2.1-large`, ...), a hub id, a local directory saved with `save_pretrained`, or a Meta `.pt` checkpoint (converted once, next to it, or under `SAM2_CONVERTED_DIR` when its folder is read-only), or `test`: the tiny SAM2 trained on synthetic shapes that `make run MODEL=test` serves (`.run/test-model` once the demo wrote it, else `devkit/sam2-shapes`; a source checkout only)",
    )
    device: str = _env(
        "DEVICE",
        default="auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="`auto` (cuda, then mps, then cpu), `cpu`, `cuda`, `cuda:1`, `mps`. On CUDA the model runs under bf16 (fp16 on older GPUs) autocast; on CPU see `CPU_PRECISION`",
    )
    cpu_precision: Literal["auto", "fp32", "bf16"] = _env(
        "CPU_PRECISION",
        default="auto",
        description="the image encoder's precision on CPU: `auto` = bf16 autocast where the CPU computes bf16 natively (AVX-512 BF16 or AMX), fp32 elsewhere (emulated bf16 is slower); `fp32`; `bf16` (force). The decoder stays fp32. The log line `image model precision: ...` and the benchmarks say which ran",
    )
    encoder_runtime: Literal["auto", "torch", "openvino"] = _env(
        "ENCODER_RUNTIME",
        default="auto",
        description="what runs the image encoder on CPU: `auto` (the default) = OpenVINO, installed with the package, PyTorch where it cannot load; `openvino` (the same, and a missing package is warned about); `torch`. OpenVINO computes in the precision `CPU_PRECISION` picks, on `TORCH_THREADS`/`--threads` threads, and serves image clicks, video frames and automatic masks. Its converted encoder is made once per model and OpenVINO version (hiera-tiny: 15-40 s on 2 cores; `label-studio-sam2 warm --model-only` makes it ahead of time) and kept in `openvino/` beside the embedding store. GPUs always run PyTorch; a failed conversion falls back to PyTorch with one warning. `/health` and the start-up log say which runtime serves",
    )
    converted_dir: str | None = _env(
        "SAM2_CONVERTED_DIR",
        default=None,
        validate_default=True,
        description="where a Meta `.pt` checkpoint in a read-only folder is converted to (default: `~/.cache/label-studio-sam2`, `XDG_CACHE_HOME` if set); a writable folder gets it next to the checkpoint",
    )
    hub_offline: bool = _env(
        "HF_HUB_OFFLINE",
        default=False,
        description="Hugging Face's own switch: `1` never contacts the hub (weights must be in the HF cache, a directory or a `.pt`); also read by `huggingface_hub` itself",
    )
    hub_endpoint: str = _env(
        "HF_ENDPOINT",
        default="https://huggingface.co",
        description="Hugging Face's own hub address (a mirror); the backend checks it answers before downloading weights, so an offline machine fails at once instead of after the hub client's retries",
    )
    # --- Label Studio -----------------------------------------------------------------------------
    label_studio_url: str | None = _env(
        "LABEL_STUDIO_URL",
        "LABEL_STUDIO_HOST",
        default=None,
        description="where the backend fetches `/data/upload/...`, `/data/local-files/...` and presigns `s3://`/`gs://`/`azure-blob://` URIs; the API of bulk pre-annotation",
    )
    label_studio_api_key: str | None = _env(
        "LABEL_STUDIO_API_KEY",
        "LABEL_STUDIO_ACCESS_TOKEN",
        default=None,
        repr=False,
        description="personal access token (preferred) or legacy token; never logged",
    )
    basic_auth_user: str | None = _env(
        "BASIC_AUTH_USER",
        default=None,
        description="with `BASIC_AUTH_PASS`: protect every endpoint but `/health`; set both or neither (one alone, or an empty password, and the server refuses to start)",
    )
    basic_auth_pass: str | None = _env(
        "BASIC_AUTH_PASS", default=None, repr=False, description="the basic auth password; never logged"
    )
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = _env(
        "ALLOWED_HOSTS",
        default=(),
        description="without basic auth: the comma-separated host names Label Studio reaches the backend by (the `Host` header; `sam2` in docker-compose), besides `localhost`, `127.0.0.1` and `::1`. `/predict`, `/setup` and `/webhook` refuse any other `Host` with 403 (DNS rebinding, see docs/deployment.md, security model); `*` accepts any (only where nothing but Label Studio can reach the port)",
    )
    # --- embeddings -------------------------------------------------------------------------------
    cache_mb: int = _env(
        "EMBEDDING_CACHE_MB",
        default=1024,
        ge=0,
        description="in-memory image embedding cache (LRU, by bytes): 16 MB per image at 1024 px",
    )
    store_dir: str | None = Field(
        default_factory=lambda: default_store_dir(),
        validation_alias=AliasChoices("EMBEDDING_STORE_DIR"),
        description="persistent embedding store, on by default (see docs/bulk.md, the embedding store) under `~/.cache/label-studio-sam2/embeddings` (`XDG_CACHE_HOME` if set; `/models/embeddings` in Docker); `off` disables it",
    )
    store_gb: float = _env(
        "EMBEDDING_STORE_GB",
        default=10.0,
        gt=0,
        description="its size bound (8 MB per image, 16 MB per tracked video frame at 1024 px)",
    )
    prefetch_tasks: int = _env(
        "PREFETCH_TASKS",
        default=3,
        ge=0,
        description="pre-encode this many next tasks after a click, at the lowest CPU priority (needs the store and LS credentials; 0 = off). The default applies on CPU, where it measured no delay to clicks (bench.prefetch; the child runs at nice 19 and, on Linux, SCHED_IDLE); on a GPU it runs only when set",
    )
    prompt_memory_s: float = _env(
        "PROMPT_MEMORY_S",
        default=300.0,
        ge=0,
        description="how long a drawn box is remembered for following clicks",
    )
    prompt_memory_mb: float = _env(
        "PROMPT_MEMORY_MB",
        default=256.0,
        gt=0,
        description="bound on the boxes and masks remembered for following clicks (about 0.26 MB per object at 1024 px, whatever the image size); the oldest go first, and entries older than `PROMPT_MEMORY_S` are dropped on every write",
    )
    # --- requests and media -----------------------------------------------------------------------
    max_image_mp: float = _env(
        "MAX_IMAGE_MP",
        default=120.0,
        gt=0,
        description="images above this many megapixels are refused (decompression bombs)",
    )
    max_download_mb: int = _env("MAX_DOWNLOAD_MB", default=200, gt=0, description="per media download")
    download_timeout_s: float = _env(
        "DOWNLOAD_TIMEOUT_S", default=30.0, gt=0, description="per media download"
    )
    media_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = _env(
        "MEDIA_ALLOWED_HOSTS",
        default=(),
        description="comma-separated hosts media may come from besides Label Studio's host; empty: any host whose addresses are all public (see docs/deployment.md, security model)",
    )
    predict_deadline_s: float = _env(
        "PREDICT_DEADLINE_S",
        default=90.0,
        gt=0,
        description="answer before Label Studio's 100 s timeout: bounds every download, and tasks not started by then get an error entry (interactive) or are handed to the background job (Retrieve)",
    )
    admission_queue_size: int = _env(
        "ADMISSION_QUEUE_SIZE",
        "QUEUE_SIZE",
        default=6,
        ge=0,
        description="the admission queue: `/predict` requests a worker admits (running + waiting); the next gets **503 with `Retry-After`** at once instead of waiting past Label Studio's 100 s. Keep it below `THREADS`",
    )
    max_body_mb: int = _env("MAX_BODY_MB", default=64, gt=0, description="request body cap (413)")
    max_regions_per_task: int = _env(
        "MAX_REGIONS_PER_TASK",
        default=500,
        ge=1,
        description='regions (boxes, keypoint objects, video rectangles) one task may prompt; more is a 400 for a click, an error entry for a task of "Retrieve predictions"',
    )
    max_points_per_task: int = _env(
        "MAX_POINTS_PER_TASK",
        default=200,
        ge=1,
        description="keypoints (clicks) one task may carry; more is a 400 (their decoding cost grows with their square)",
    )
    decode_batch: int = _env(
        "DECODE_BATCH",
        default=8,
        ge=1,
        description="boxes decoded per decoder call: memory stays flat whatever the box count (bench.memory), the model lock is released between batches (a click waits at most one batch) and `PREDICT_DEADLINE_S` is checked between them",
    )
    max_label_config_kb: int = _env(
        "MAX_LABEL_CONFIG_KB",
        default=1024,
        ge=1,
        description="largest label config `/setup` and `/predict` accept (413 above)",
    )
    setup_cache_mb: float = _env(
        "SETUP_CACHE_MB",
        default=32.0,
        gt=0,
        description="label configs `/setup` remembers per project, least recently used dropped first",
    )
    video_max_frames: int = _env(
        "VIDEO_MAX_FRAMES", default=300, ge=1, description="frames tracked each way from the prompted frames"
    )
    # --- bulk pre-annotation ("Retrieve predictions" and `label-studio-sam2 preannotate`) ---------
    retrieve_mode: Literal["boxes", "auto", "none"] = _env(
        "RETRIEVE_MODE",
        default="boxes",
        description='what "Retrieve predictions" (no context) does: `boxes` (masks for the latest annotation\'s rectangles), `auto` (automatic masks), `none`',
    )
    output: Literal["auto", "brush", "polygon"] = _env(
        "OUTPUT",
        default="auto",
        description="bulk output: `auto` (the config's BrushLabels, else PolygonLabels), `brush`, `polygon`",
    )
    boxes_from: Literal["annotation", "prediction"] = _env(
        "BOXES_FROM",
        default="annotation",
        description="boxes mode reads the rectangles of the latest `annotation` or `prediction`",
    )
    auto_label: str | None = _env(
        "AUTO_LABEL",
        default=None,
        description="label of automatic masks (default: the output control's first)",
    )
    roi_label: str | None = _env(
        "ROI_LABEL",
        default=None,
        description="automatic masks only inside rectangles with this label (default: whole image)",
    )
    points_per_side: int = _env(
        "POINTS_PER_SIDE",
        default=16,
        ge=1,
        description="automatic-mask grid (SAM2 uses 32; 16 keeps CPUs usable)",
    )
    auto_iou_thresh: float = _env(
        "AUTO_IOU_THRESH", default=0.8, ge=0, le=1, description="minimum predicted IoU of an automatic mask"
    )
    auto_stability_thresh: float = _env(
        "AUTO_STABILITY_THRESH",
        default=0.92,
        ge=0,
        le=1,
        description="minimum stability score of an automatic mask",
    )
    min_area: int = _env("MIN_AREA", default=100, ge=0, description="smallest automatic mask, pixels")
    max_masks: int = _env(
        "AUTO_MAX_MASKS", default=100, ge=1, description="automatic masks per image at most"
    )
    auto_fast: bool = _env(
        "AUTO_FAST",
        default=False,
        description="automatic masks, fast mode: decode every other grid point of every other row first, then only the points next to one that found a candidate and outside the confident masks found (`preannotate --fast`; on the test images it decoded 36-60 % of the grid points and found 96-98 % of the full run's masks, see docs/benchmarks.md)",
    )
    polygon_tolerance: float = _env(
        "POLYGON_TOLERANCE", default=1.0, ge=0, description="polygon simplification, pixels"
    )
    background_job: bool = _env(
        "BACKGROUND_JOB",
        default=True,
        description='finish a "Retrieve predictions" too large for one request in a background job that writes through the LS API',
    )
    # --- the job queue (REDIS_URL set: `label-studio-sam2 worker`, `preannotate --queue`) -----------
    job_chunk_tasks: int = _env(
        "JOB_CHUNK_TASKS",
        "QUEUE_CHUNK_TASKS",
        default=20,
        ge=1,
        le=10000,
        description="tasks per job of the job queue: a worker takes a chunk at a time; smaller chunks spread a project over more workers, larger ones cost fewer Redis round trips",
    )
    job_lease_s: float = _env(
        "JOB_LEASE_S",
        default=60.0,
        ge=3,
        description="a worker renews the lease on its job every third of this; a job whose worker stopped renewing (killed, machine lost) is requeued by another worker at most 1.5 x this later",
    )
    # --- fine-tuned decoders (`label-studio-sam2 train`, Label Studio's "Start Training") ----------
    finetune_dir: str | None = _env(
        "SAM2_FINETUNE_DIR",
        default=None,
        validate_default=True,
        description="fine-tuned decoders per project (default: `~/.cache/label-studio-sam2/finetuned`; see docs/fine-tuning.md)",
    )
    finetune_refresh_s: float = _env(
        "FINETUNE_REFRESH_S", default=30.0, ge=0, description="how often a server looks for a new version"
    )
    finetune_epochs: int = _env("FINETUNE_EPOCHS", default=20, ge=1, description="fine-tuning epochs")
    finetune_lr: float = _env("FINETUNE_LR", default=1e-4, ge=0, description="fine-tuning learning rate")
    finetune_min_gain: float = _env(
        "FINETUNE_MIN_GAIN",
        default=0.02,
        description="held-out mIoU gain a fine-tuned decoder needs before it is activated",
    )
    max_trainings: int = _env(
        "MAX_TRAININGS",
        default=1,
        ge=1,
        le=64,
        description="fine-tuning runs at once, across the server's workers and the `train` CLI sharing SAM2_FINETUNE_DIR (one run takes every CPU core); another START_TRAINING is answered 429 until one ends",
    )
    # --- scale-out (Redis + RQ) ---------------------------------------------------------------------
    redis_url: str | None = _env(
        "REDIS_URL",
        default=None,
        repr=False,
        description="`redis://[:password@]host:6379/0`: share prompt memory between workers and replicas and send background work (Retrieve overflow, long video tracks, `preannotate --queue`) to an RQ queue that `label-studio-sam2 worker` processes. Unset: everything in-process. Never logged (it may hold a password)",
    )
    # --- process ----------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = _env(
        "LOG_LEVEL", default="INFO", description="`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`"
    )
    host: str | None = _env(
        "HOST",
        default=None,
        description="where to listen: `serve` defaults to 127.0.0.1, gunicorn to 0.0.0.0",
    )
    port: int = _env("PORT", default=9090, ge=1, le=65535, description="where to listen (`serve`, gunicorn)")
    # --- gunicorn (deploy/gunicorn.conf.py) -------------------------------------------------------
    workers: int = _env(
        "WORKERS",
        default=1,
        ge=1,
        description="gunicorn processes; each holds one model. Use one per GPU. Above 1, set `REDIS_URL` so that every worker knows the box a labeler drew",
    )
    threads: int = _env(
        "THREADS",
        default=8,
        ge=1,
        description="threads per worker (gthread): spare threads answer `/health`, `/metrics` and 503s while the model is busy",
    )
    worker_connections: int = _env(
        "WORKER_CONNECTIONS",
        default=64,
        ge=1,
        description="connections a worker holds at once (running, waiting for a thread, kept alive)",
    )
    timeout_s: int = _env(
        "TIMEOUT",
        default=180,
        ge=1,
        description="seconds before a silent gunicorn worker is restarted (above Label Studio's 100 s)",
    )
    graceful_timeout_s: int = _env(
        "GRACEFUL_TIMEOUT", default=30, ge=0, description="on SIGTERM, how long requests in flight may take"
    )
    header_timeout_s: float = _env(
        "HEADER_TIMEOUT_S",
        default=10.0,
        gt=0,
        description="a client must send its request headers within this; until then it holds no thread (see docs/deployment.md, security model)",
    )
    keepalive_s: int = _env(
        "KEEPALIVE",
        default=5,
        ge=0,
        description="seconds gunicorn keeps an idle connection from Label Studio open",
    )
    access_log: bool = _env(
        "ACCESS_LOG",
        default=True,
        description="`false` turns off gunicorn's access log (request lines only, never headers)",
    )
    metrics_dir: str | None = _env(
        "PROMETHEUS_MULTIPROC_DIR",
        default=None,
        description="where gunicorn workers keep their metrics so that `/metrics` adds up all of them (prometheus-client's multiprocess mode); emptied when gunicorn starts. Unset: a fresh temporary directory (on `/dev/shm` where there is one), removed when gunicorn exits",
    )
    torch_threads: int | None = _env(
        "TORCH_THREADS",
        default=None,
        ge=1,
        description="torch CPU threads per gunicorn worker (default: cores / `WORKERS`)",
    )

    @field_validator("media_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        if isinstance(value, str):
            return tuple(h.strip() for h in value.split(",") if h.strip())
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_server_names(cls, value):
        if isinstance(value, str):
            value = value.split(",")
        return tuple(h.strip().lower().removesuffix(".") for h in value if h.strip())

    @field_validator("converted_dir", mode="after")
    @classmethod
    def _converted_default(cls, value):
        return value or str(cache_home())

    @field_validator("finetune_dir", mode="after")
    @classmethod
    def _finetune_default(cls, value):
        return str(Path(value).expanduser()) if value else str(cache_home() / "finetuned")

    @field_validator("store_dir", mode="after")
    @classmethod
    def _store_off(cls, value):
        return None if value is not None and value.strip().lower() in STORE_OFF else value

    @field_validator(
        "cpu_precision", "encoder_runtime", "retrieve_mode", "output", "boxes_from", mode="before"
    )
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    @field_validator("model", mode="after")
    @classmethod
    def _test_model(cls, value):
        return test_model_dir() if value.strip().lower() == "test" else value

    @field_validator("label_studio_url", mode="after")
    @classmethod
    def _no_trailing_slash(cls, value):
        return without_userinfo(value).rstrip("/") if value else value

    @field_validator("redis_url", mode="after")
    @classmethod
    def _redis_scheme(cls, value):
        if value is None or not value.strip():
            return None  # REDIS_URL= (empty): no Redis
        if value.partition("://")[0].lower() not in ("redis", "rediss", "unix"):  # never echo it
            raise ValueError("must be redis://[:password@]host:port/db (or rediss://, unix://)")
        return value

    @property
    def encoder_cache_dir(self) -> str:
        """Where ENCODER_RUNTIME=openvino keeps converted encoders: `openvino/` beside the embedding
        store (`/models/openvino` in Docker), beside its default when the store is off."""
        return str(Path(self.store_dir or default_store_dir()).parent / "openvino")

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        """The environment's settings; `overrides` (field names, None = keep) win over it.
        Raises SettingsError naming the variable whose value is invalid."""
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            raise TypeError(f"unknown setting {', '.join(sorted(unknown))}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if "BASIC_AUTH_PASS" in os.environ and "basic_auth_pass" not in values:
            values["basic_auth_pass"] = os.environ["BASIC_AUTH_PASS"]  # empty is refused, not unset
        try:
            settings = cls(**values)
        except ValidationError as e:
            raise SettingsError(_describe(e)) from None
        settings.check()
        warn_deprecated_names()
        return settings

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


def warn_deprecated_names() -> list[str]:
    """Warn about each renamed variable set under its old name (see DEPRECATED_NAMES); returns
    the warnings."""
    said = []
    for old, new in DEPRECATED_NAMES.items():
        if not os.environ.get(old):
            continue
        if os.environ.get(new):
            said.append(f"{old} is ignored: {new}, its new name, is set too; unset {old}")
        else:
            said.append(f"{old} is deprecated: rename it {new} (the old name still works for now)")
    for message in said:
        log.warning(message)
    return said


def _env_name(field: str) -> str:
    """The variable a field was read from: the first of its names set (non-empty) in the
    environment, else its primary name."""
    alias = Settings.model_fields[field].validation_alias
    if not isinstance(alias, AliasChoices):
        return field
    names = [str(n) for n in alias.choices]
    return next((n for n in names if os.environ.get(n)), names[0])


def _field_of(loc: str) -> str | None:
    """The field an error's location names: a field name (an override) or one of its variables
    (read from the environment)."""
    if loc in Settings.model_fields:
        return loc
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices) and loc in [str(n) for n in alias.choices]:
            return name
    return None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "?"
        key = _field_of(name)
        field = Settings.model_fields[key] if key else None
        if key is not None:
            name = _env_name(key)
        shown = "" if field is not None and not field.repr else f"={item.get('input')!r}"  # no secrets
        lines.append(f"{name}{shown}: {item['msg']}")
    return "invalid setting: " + "; ".join(lines)


def env_table() -> str:
    """The table of docs/configuration.md: every environment variable, its default and what it does."""
    rows = ["| Variable | Default | What it does |", "|---|---|---|"]
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if not isinstance(alias, AliasChoices):
            continue
        names = [str(n) for n in alias.choices]
        variable = f"`{names[0]}`" + "".join(f" (or `{n}`)" for n in names[1:])
        default = "on" if field.default_factory is not None else field.default
        shown = (
            ""
            if default in (None, ())
            else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        )
        rows.append(f"| {variable} | {shown} | {field.description.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m label_studio_sam2.service.settings: docs/configuration.md's table
    print(env_table())
