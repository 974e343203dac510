"""gunicorn settings for a team deployment: `gunicorn -c deploy/gunicorn.conf.py label_studio_sam2.labelstudio.wsgi:app`.

Shape: WORKERS processes x THREADS threads. Each worker holds one SAM2 model (loaded after fork,
in the worker) and serialises requests around it; threads let /health, /metrics and quick 503s be
answered while a request runs. Each worker admits ADMISSION_QUEUE_SIZE /predict requests (running +
waiting, see label_studio_sam2/service/admission.py) and answers the next with 503 + Retry-After instead of letting
them pile up past Label Studio's 100 s timeout. ADMISSION_QUEUE_SIZE must stay below THREADS.

One GPU: WORKERS=1 (a second copy of the model buys little: the GPU is the bottleneck).
CPU box: WORKERS = cores / TORCH_THREADS, e.g. 16 cores -> WORKERS=4 with 4 torch threads each.
Above one worker, set REDIS_URL: a box drawn on one worker is then known to the worker that gets
the next click. /metrics adds up every worker (prometheus-client multiprocess mode, set up below).

Every value comes from label_studio_sam2.service.settings.Settings (the environment, validated: a bad value stops
the master with a message naming the variable). This file is read by the gunicorn master, which
must never import torch: CUDA initialised before fork breaks every worker ("Cannot re-initialize
CUDA in forked subprocess"); label_studio_sam2.service.settings imports no torch.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository (or /app)

from label_studio_sam2.service.settings import Settings, SettingsError  # noqa: E402

try:  # also where auth fails closed: half a basic auth pair or an empty password stops the master
    settings = Settings.from_env()
except SettingsError as e:
    sys.exit(f"label-studio-sam2: {e}")

# --- sockets and processes ----------------------------------------------------------------------
bind = [f"{settings.host or '0.0.0.0'}:{settings.port}"]
workers = settings.workers
# gthread with request headers read by the event loop (label_studio_sam2/labelstudio/gworker.py): clients that send
# their headers slowly hold no thread, and are cut off after HEADER_TIMEOUT_S (10 s)
worker_class = "label_studio_sam2.labelstudio.gworker.HeaderTimeoutWorker"
threads = settings.threads
# connections a worker holds at once (running, waiting for a thread, kept alive); beyond it the
# kernel's listen backlog holds them
worker_connections = settings.worker_connections
backlog = 128

# No preloading: the app (and the model) is built in each worker after fork. label_studio_sam2.labelstudio.wsgi:app is
# lazy anyway, so even preload_app=True would not load a model in the master.
preload_app = False

# --- time ---------------------------------------------------------------------------------------
# Label Studio waits 100 s for /predict (ML_TIMEOUT_PREDICT); the backend answers within
# PREDICT_DEADLINE_S (90 s). A worker silent for longer than this is stuck and gets restarted.
timeout = settings.timeout_s
# On SIGTERM (docker stop, a deploy) finish the requests in flight, up to this long.
graceful_timeout = settings.graceful_timeout_s
keepalive = settings.keepalive_s  # Label Studio keeps connections to the backend open

# --- limits -------------------------------------------------------------------------------------
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 16384  # the body is capped by the app (MAX_BODY_MB -> 413)

# --- logs ---------------------------------------------------------------------------------------
# Request lines only: never headers (Authorization), never bodies. The request line of this
# protocol carries no secret (no tokens in query strings).
accesslog = "-" if settings.access_log else None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
loglevel = settings.log_level.lower()
# heartbeat files on tmpfs: a container's overlay filesystem can stall the worker heartbeat
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
proc_name = "label-studio-sam2"


# --- metrics of all workers ----------------------------------------------------------------------
# prometheus-client's multiprocess mode: each worker writes its metrics to files in one directory
# and /metrics, on whichever worker answers, adds them up (label_studio_sam2/service/metrics.py). The variable must
# be set before a worker imports prometheus_client: on_starting runs in the master before the
# first fork (the master itself imports it only in child_exit).
METRICS_DIR_OWNED: list[str] = []  # the temporary directory made here, removed on exit


def _prepare_metrics_dir(server) -> None:
    path = settings.metrics_dir
    if path:  # the operator's: files of an earlier run would be added to this one's
        os.makedirs(path, exist_ok=True)
        for old in glob.glob(os.path.join(path, "*.db")):
            os.remove(old)
    else:
        try:  # tmpfs where there is one (memory-mapped files), else the temporary directory
            path = tempfile.mkdtemp(prefix="sam2-metrics-", dir="/dev/shm")
        except OSError:
            path = tempfile.mkdtemp(prefix="sam2-metrics-")
        METRICS_DIR_OWNED.append(path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    server.log.info("label-studio-sam2: workers keep their metrics in %s", path)


# --- hooks --------------------------------------------------------------------------------------
def on_starting(server):
    _prepare_metrics_dir(server)


def on_exit(server):
    for path in METRICS_DIR_OWNED:
        shutil.rmtree(path, ignore_errors=True)


def child_exit(server, worker):
    # a worker that exited (restarted, timed out, or stopped) no longer counts in the live gauges;
    # its counters and histograms stay in the sums
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")  # never imported here: only looked at if something did
    return bool(torch is not None and torch.cuda.is_initialized())


def when_ready(server):
    server.log.info(
        "label-studio-sam2: %d worker(s) x %d thread(s), admission queue %s per worker, timeout %ds, model %s",
        server.cfg.workers,
        server.cfg.threads,
        settings.admission_queue_size,
        server.cfg.timeout,
        settings.model,
    )
    queue = settings.admission_queue_size
    if queue <= 0 or queue >= server.cfg.threads:
        server.log.warning(
            "ADMISSION_QUEUE_SIZE=%d with THREADS=%d: keep ADMISSION_QUEUE_SIZE between 1 and THREADS-1 so busy workers "
            "answer 503 at once instead of queueing connections without bound",
            queue,
            server.cfg.threads,
        )


def pre_fork(server, worker):
    if _cuda_initialised():
        raise RuntimeError(
            "CUDA was initialised in the gunicorn master before forking workers; the model must be "
            "loaded in each worker (keep preload_app off and import nothing that touches torch.cuda "
            "in the master)"
        )


def post_fork(server, worker):
    # torch's CPU threads: share the cores between workers instead of each taking all of them
    if "OMP_NUM_THREADS" not in os.environ:
        cores = os.cpu_count() or 1
        torch_threads = settings.torch_threads or max(1, cores // max(1, server.cfg.workers))
        os.environ["OMP_NUM_THREADS"] = str(torch_threads)
    server.log.info("worker %s forked (OMP_NUM_THREADS=%s)", worker.pid, os.environ["OMP_NUM_THREADS"])


def post_worker_init(worker):
    # Build the app now, in this worker: its model starts loading in a background thread, so the
    # first click does not wait for the weights and /health reports model_loaded as soon as it can.
    load = getattr(worker.wsgi, "load", None)
    if callable(load):
        load()


def worker_int(worker):
    worker.log.info("worker %s interrupted: finishing requests in flight", worker.pid)


def worker_abort(worker):
    # SIGABRT after `timeout`: a request outlived every deadline; say so before the worker goes
    worker.log.error("worker %s timed out after %ds and is being restarted", worker.pid, worker.cfg.timeout)
