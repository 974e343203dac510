"""The composition root: the model and everything built around it, once per process.

`Runtime` owns what lives as long as the process: the settings it was given, the metrics, the
media client, the prompt memory (shared through Redis with REDIS_URL), the loaded image model
with its embedding cache and store, the video tracker (built on the first video task), the
prefetcher, and what an adapter keeps for the process's lifetime (`extensions`: Label Studio's
"Retrieve predictions" keeps its task times and background job there). The runtime speaks no
annotation tool: the adapter gives it the media credentials (`auth`). The server
(`label_studio_sam2.labelstudio.app`), the pre-encoding job (`label_studio_sam2.labelstudio.warm`) and the bulk CLI
(`label_studio_sam2.cli.preannotate`) all build one (Label Studio's through
`label_studio_sam2.labelstudio.runtime.runtime_for`); nothing else keeps per-process state in module globals.
"""

from __future__ import annotations

import logging
import threading
import time

from label_studio_sam2.engine.gpu import memory_gauges
from label_studio_sam2.engine.image import EmbeddingCache, ImagePredictor
from label_studio_sam2.engine.models import HubAccess, LoadedModel, load_image_model, load_video_model
from label_studio_sam2.engine.store import EmbeddingStore
from label_studio_sam2.engine.tracker import VideoTracker
from label_studio_sam2.service.admission import AdmissionQueue
from label_studio_sam2.service.errors import Unavailable
from label_studio_sam2.service.finetuned import ProjectSegmenters, TrainingLauncher
from label_studio_sam2.service.handoff import Handoff, job_settings
from label_studio_sam2.service.inflight import Coalescer
from label_studio_sam2.service.jobqueue import JobQueue
from label_studio_sam2.service.media import MediaAuth, MediaClient, MediaLimits, NoAuth
from label_studio_sam2.service.metrics import Metrics
from label_studio_sam2.service.prefetch import Prefetcher
from label_studio_sam2.service.promptmemory import PromptMemory
from label_studio_sam2.service.redismemory import RedisPromptMemory
from label_studio_sam2.service.schemas import SchemaCache
from label_studio_sam2.service.segment import ImageSegmenter
from label_studio_sam2.service.settings import Settings

log = logging.getLogger("label_studio_sam2")


def load_configured_model(settings: Settings):
    """The image model `settings` name, as every process loads it (server, worker, CLI): model,
    device, CPU precision and encoder runtime, with the runtime's cache beside the store (the
    engine reads no environment: every option is passed here)."""
    return load_image_model(
        settings.model,
        settings.device,
        settings.cpu_precision,
        settings.encoder_runtime,
        settings.encoder_cache_dir,
        settings.converted_dir,
        hub_access(settings),
    )


def hub_access(settings: Settings) -> HubAccess:
    """HF_HUB_OFFLINE and HF_ENDPOINT, as the engine takes them."""
    return HubAccess(settings.hub_offline, settings.hub_endpoint)


class Runtime:
    """The model and everything built around it, loaded once per process.

    `loaded`: an already loaded model (tests, the CLIs), used as is. Otherwise, with
    `load_in_background`, the model loads in a thread so /health answers while weights load;
    without, call `load()`. `auth`: the media credentials the adapter gives (Label Studio's
    token: `label_studio_sam2.labelstudio.runtime.runtime_for`); none, only absolute http(s) and
    data: URLs are fetched.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        loaded: LoadedModel | None = None,
        *,
        load_in_background: bool = True,
        auth: MediaAuth | None = None,
    ):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.ready = threading.Event()
        self.error: str | None = None
        self.segmenter: ImageSegmenter | None = None
        self.image_model: LoadedModel | None = None
        self.store: EmbeddingStore | None = None
        self.prefetcher: Prefetcher | None = None
        self.project_segmenters: ProjectSegmenters | None = None  # once the model is loaded
        self._trainer: TrainingLauncher | None = None
        self._video_tracker: VideoTracker | None = None
        self._video_lock = threading.Lock()
        self.video_calls = Coalescer()  # Label Studio's concurrent identical video requests
        self.schemas = SchemaCache(int(settings.setup_cache_mb * (1 << 20)))  # project id -> label config
        # the /predict admission queue (ADMISSION_QUEUE_SIZE): how many requests this process admits
        self.admission = AdmissionQueue(settings.admission_queue_size)
        self.metrics.watch_admission(self.admission)
        # what an adapter keeps for the process's lifetime, by name (Label Studio's Retrieve: its
        # task times and background job); `extension` creates an entry once
        self.extensions: dict[str, object] = {}
        self._extensions_lock = threading.Lock()
        # the one hand-off of background work: RQ with REDIS_URL, else threads and child processes
        self.handoff = Handoff(
            settings, lambda: JobQueue(settings.redis_url, settings.job_chunk_tasks, self._carried)
        )
        limits = MediaLimits(
            max_bytes=settings.max_download_mb << 20,
            max_pixels=int(settings.max_image_mp * 1e6),
            timeout_s=settings.download_timeout_s,
            allowed_hosts=settings.media_allowed_hosts,
            deadline_s=settings.predict_deadline_s,  # no download outlives its request
        )
        self.media = MediaClient(auth if auth is not None else NoAuth(), limits)
        # the box a labeler drew, for the clicks that follow: shared by every worker and replica
        # through Redis when there is one, else this process's own
        memory_bytes = int(settings.prompt_memory_mb * (1 << 20))
        self.memory: PromptMemory | RedisPromptMemory = (
            RedisPromptMemory(settings.redis_url, settings.prompt_memory_s, max_bytes=memory_bytes)
            if settings.redis_url
            else PromptMemory(settings.prompt_memory_s, max_bytes=memory_bytes)
        )
        if settings.redis_url:  # queue depth, jobs and per-worker counts, read from Redis at scrape time
            self.metrics.watch_fleet(self.job_queue().snapshot)
        if loaded is not None:
            self._build(loaded)
        elif load_in_background:
            threading.Thread(target=self.load, name="model-loader", daemon=True).start()

    @property
    def model_version(self) -> str:
        if self.image_model is None:
            return "sam2"
        mid = self.image_model.model_id
        return mid if mid.startswith("sam2") else f"sam2-{mid}"

    def load(self) -> None:
        try:
            start = time.perf_counter()
            loaded = load_configured_model(self.settings)
            log.info(
                "loaded %s on %s in %.1f s; image encoder runtime %s: %s",
                loaded.source,
                loaded.device,
                time.perf_counter() - start,
                loaded.encoder_runtime,
                loaded.precision,
            )
            self._build(loaded)
        except Exception as e:  # ModelUnavailable and anything else: /predict reports it
            self.error = str(e)
            log.error("model not loaded: %s", e)
            self.ready.set()

    def _build(self, loaded: LoadedModel) -> None:
        self.image_model = loaded
        cache = EmbeddingCache(self.settings.cache_mb << 20)
        store = None
        if self.settings.store_dir:
            try:
                store = EmbeddingStore(self.settings.store_dir, int(self.settings.store_gb * (1 << 30)))
            except OSError as e:  # on by default: an unwritable cache directory only costs re-encoding
                log.warning("embedding store %s unusable, running without it: %s", self.settings.store_dir, e)
        if store is not None:
            self.metrics.watch_store(store)
        self.store = store
        # the default is measured on CPU only (nice 19 yields the CPU; a GPU has no such priority)
        chosen = "prefetch_tasks" in self.settings.model_fields_set or loaded.device.type == "cpu"
        if store is not None and self.settings.prefetch_tasks > 0 and chosen:
            self.prefetcher = Prefetcher(self.settings, loaded.source)
        predictor = ImagePredictor(loaded, cache, store, decode_batch=self.settings.decode_batch)
        predictor.on_timing = lambda part, s: self.metrics.model_seconds.labels(part).observe(s)
        self.metrics.watch_cache(cache)
        self.segmenter = ImageSegmenter(
            predictor, self.media, self.model_version, self.memory, self.settings.max_regions_per_task
        )
        self.project_segmenters = ProjectSegmenters(self.segmenter, self.settings)
        if loaded.device.type == "cuda":
            self.metrics.watch(lambda: memory_gauges(loaded.device))
        self.ready.set()

    def require(self, timeout_s: float = 20.0) -> ImageSegmenter:
        # well inside Label Studio's 100 s: a 503 with Retry-After beats a dropped request
        if not self.ready.wait(timeout_s):
            raise Unavailable("the SAM2 model is still loading; try again in a moment")
        if self.segmenter is None:
            raise Unavailable(f"the SAM2 model could not be loaded: {self.error}")
        return self.segmenter

    def segmenter_for(self, project: int | None) -> ImageSegmenter:
        """The project's fine-tuned decoder if it has an active one (its own model_version),
        else the base model's segmenter."""
        base = self.require()
        return self.project_segmenters.get(project) if self.project_segmenters else base

    def start_training(self, project: int) -> dict:
        """Label Studio's "Start Training": fine-tune this project's decoder in the background."""
        if self._trainer is None:
            self._trainer = TrainingLauncher(self.settings)
        source = self.image_model.source if self.image_model is not None else self.settings.model
        return self._trainer.start(project, source)

    def video_tracker(self) -> VideoTracker:
        """The video model, loaded on the first video task (sharing the image encoder and the
        embedding store: a re-track of a video runs no encoder on frames tracked before)."""
        with self._video_lock:
            if self._video_tracker is None:
                loaded = load_video_model(
                    self.image_model.source,
                    self.settings.device,
                    share_with=self.image_model,
                    hub=hub_access(self.settings),
                )
                self._video_tracker = VideoTracker(loaded, store=self.store)
            return self._video_tracker

    def extension(self, name: str, create):
        """The adapter's `name` entry of `extensions`, made by `create()` on first use (once, under
        a lock, however many threads ask). `create()` may return None: nothing is kept, and the
        next call tries again."""
        with self._extensions_lock:
            value = self.extensions.get(name)
            if value is None:
                value = create()
                if value is not None:
                    self.extensions[name] = value
            return value

    def _carried(self) -> dict:
        """What every job this server queues carries: its effective non-secret settings."""
        return job_settings(self.settings, self.image_model.model_id if self.image_model else None)

    def job_queue(self) -> JobQueue | None:
        """The RQ job queue in Redis (REDIS_URL), or None: background work stays in-process. No
        connection is made here: the first enqueue finds out whether Redis is up."""
        return self.handoff.queue
