"""Every Prometheus metric of the backend, one registry per app (tests make many apps in one
process). Counters, histograms and gauges are defined here; `watch_*` adds gauges read at scrape
time; `add_collector` adds a collector that reads a shared source (Redis, say) at scrape time.

Under gunicorn every worker is its own process, and a scrape reaches one of them.
deploy/gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before any worker imports
prometheus_client, which turns on its multiprocess mode: each worker keeps its counters,
histograms and gauges in files of that directory, and whichever worker answers `/metrics` adds up
all of them (`MultiProcessCollector`). Watched values live in one worker's memory, so in that mode
`publish` writes them to gauges (after every request and before a scrape), combined over workers
as `_combine_mode` says. Collectors added with `add_collector` are asked once per scrape in
both modes: the multiprocess merge reads only the files, never custom collectors. `serve` (one
process, no PROMETHEUS_MULTIPROC_DIR) reads its own registry, as always.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100)


def multiprocess_mode() -> bool:
    """Whether prometheus_client keeps values in PROMETHEUS_MULTIPROC_DIR (decided when it was
    first imported, from the environment of that moment)."""
    return values.ValueClass is not values.MutexValue


def _combine_mode(name: str) -> str:
    """How a watched gauge combines over live gunicorn workers."""
    if name.startswith("sam2_gpu_memory_"):
        return "liveall"  # one series per worker (label `pid`): workers may sit on different GPUs
    if name == "sam2_embedding_store_bytes":
        return "livemax"  # one directory, shared by the workers: each sees the same total
    return "livesum"  # per-worker amounts (requests waiting, cache bytes, hits): the fleet's sum


class Metrics:
    def __init__(self):
        self.multiprocess = multiprocess_mode()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sam2_requests", "HTTP requests by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.latency = Histogram(
            "sam2_request_seconds",
            "Request latency by endpoint and outcome",
            ["endpoint", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "sam2_model_seconds",
            "Time in the image encoder / mask decoder",
            ["part"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tasks = Counter("sam2_tasks", "Tasks answered, by outcome", ["outcome"], registry=r)
        self.in_flight = Gauge(
            "sam2_requests_in_flight",
            "Requests being served or queued",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.admission_rejected = Counter(
            "sam2_admission_rejected",
            "/predict requests answered 503 because the admission queue was full",
            registry=r,
        )
        # "Retrieve predictions" handed to the background job (label_studio_sam2.labelstudio.retrieve)
        self.background_tasks = Counter(
            "sam2_background_tasks", "Tasks of the background job, by outcome", ["outcome"], registry=r
        )
        self._sources: list = []
        self._collectors: list = []
        self._published: dict[str, Gauge] = {}
        self._publish_lock = threading.Lock()
        if not self.multiprocess:
            r.register(_Collector(self._sources))

    def watch(self, fn) -> None:
        """`fn()` returns [(name, help, value)] at scrape time (cache sizes, GPU memory...)."""
        self._sources.append(fn)

    def add_collector(self, collector) -> None:
        """A prometheus collector (an object with `collect()`) asked at every scrape, once: for
        values kept outside the workers, such as a queue's depth in Redis, which must not be
        added up per worker."""
        self._collectors.append(collector)
        if not self.multiprocess:
            self.registry.register(collector)

    def scrape(self) -> bytes:
        """The text `/metrics` answers: this process's metrics, or under gunicorn (multiprocess
        mode) those of every worker, added up."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        self.publish()
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        for collector in self._collectors:
            registry.register(collector)
        return generate_latest(registry)

    def publish(self) -> None:
        """Multiprocess mode: write this worker's watched values where every worker's scrape
        reads them (a no-op in one process, where they are read at scrape time)."""
        if not self.multiprocess:
            return
        with self._publish_lock:
            for fn in self._sources:
                for name, help_text, value in fn():
                    gauge = self._published.get(name)
                    if gauge is None:
                        gauge = self._published[name] = Gauge(
                            name, help_text, multiprocess_mode=_combine_mode(name), registry=None
                        )
                    gauge.set(float(value))

    def watch_cache(self, cache) -> None:
        """The in-memory embedding cache (label_studio_sam2.engine.image.EmbeddingCache)."""
        self.watch(
            lambda: [
                ("sam2_embedding_cache_hits", "Embedding cache hits", cache.hits),
                ("sam2_embedding_cache_misses", "Embedding cache misses", cache.misses),
                ("sam2_embedding_cache_bytes", "Bytes held by the embedding cache", cache.bytes),
                ("sam2_embedding_cache_entries", "Images in the embedding cache", len(cache)),
            ]
        )

    def watch_store(self, store) -> None:
        """The persistent embedding store (label_studio_sam2.engine.store.EmbeddingStore)."""
        self.watch(
            lambda: [
                ("sam2_embedding_store_hits", "Embedding store (disk) hits", store.hits),
                ("sam2_embedding_store_misses", "Embedding store (disk) misses", store.misses),
                ("sam2_embedding_store_bytes", "Bytes in the embedding store", store.bytes),
                ("sam2_embedding_store_corrupt", "Corrupt store entries found (re-encoded)", store.corrupt),
            ]
        )

    def watch_admission(self, queue) -> None:
        """A worker's /predict admission queue (label_studio_sam2.service.admission.AdmissionQueue);
        not the job queue (`watch_fleet`)."""
        self.watch(
            lambda: [
                ("sam2_admission_depth", "/predict requests in this worker, running or waiting", queue.depth),
                (
                    "sam2_admission_capacity",
                    "/predict requests a worker admits before answering 503",
                    queue.capacity,
                ),
            ]
        )

    def watch_background(self, pending) -> None:
        """The "Retrieve predictions" background job: `pending()` tasks queued or running."""
        self.watch(
            lambda: [("sam2_background_tasks_pending", "Tasks queued for the background job", pending())]
        )

    def watch_fleet(self, snapshot) -> None:
        """The job queue and its workers (label_studio_sam2.service.jobqueue.JobQueue.snapshot), read from Redis at
        scrape time: every server replica and gunicorn worker shows the same numbers, which no
        per-process counter could (workers are other processes, on other machines)."""
        self.add_collector(_FleetCollector(snapshot))


class _FleetCollector:
    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        up = GaugeMetricFamily("sam2_jobqueue_up", "1 if Redis (REDIS_URL) answered this scrape")
        try:
            snap = self.snapshot()
        except Exception:  # Redis down: /metrics still answers, and says so
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        jobs = GaugeMetricFamily(
            "sam2_jobqueue_jobs", "Jobs of the job queue by state (queued = depth)", labels=["state"]
        )
        for state, n in snap["jobs"].items():
            jobs.add_metric([state], float(n))
        yield jobs
        workers = GaugeMetricFamily("sam2_jobqueue_workers", "Workers listening on the job queue")
        workers.add_metric([], float(snap["workers"]))
        yield workers
        done = CounterMetricFamily(
            "sam2_worker_jobs", "Jobs ended per worker, by outcome", labels=["worker", "outcome"]
        )
        seconds = CounterMetricFamily(
            "sam2_worker_job_seconds", "Seconds spent in jobs per worker", labels=["worker"]
        )
        for name, counts in sorted(snap["per_worker"].items()):
            done.add_metric([name, "ok"], counts.get("jobs", 0.0))
            done.add_metric([name, "failed"], counts.get("failed", 0.0))
            seconds.add_metric([name], counts.get("seconds", 0.0))
        yield done
        yield seconds


class _Collector:
    def __init__(self, sources):
        self.sources = sources

    def collect(self):
        for fn in self.sources:
            for name, help_text, value in fn():
                g = GaugeMetricFamily(name, help_text)
                g.add_metric([], float(value))
                yield g
