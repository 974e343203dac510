"""`label-studio-sam2 worker`: a model worker taking the server's queued jobs (bulk chunks, video
tracks, pre-encoding) from Redis."""

from __future__ import annotations

import os
import socket

from label_studio_sam2.cli.options import model_settings
from label_studio_sam2.engine.models import set_cpu_threads
from label_studio_sam2.engine.releases import ModelUnavailable
from label_studio_sam2.labelstudio.api import LabelStudioAPI, LabelStudioAPIError, describe
from label_studio_sam2.labelstudio.jobs import JobRunner
from label_studio_sam2.labelstudio.runtime import runtime_for
from label_studio_sam2.service import worker
from label_studio_sam2.service.jobqueue import JobQueue, QueueUnavailable
from label_studio_sam2.service.logs import setup_logging
from label_studio_sam2.service.runtime import load_configured_model
from label_studio_sam2.service.settings import Settings


def cmd_worker(args) -> None:
    settings = Settings.from_env(
        **model_settings(args), label_studio_url=args.url, label_studio_api_key=args.api_key
    )
    setup_logging(settings)
    if not settings.redis_url:
        raise SystemExit("worker: set REDIS_URL (the Redis the server queues its work in)")
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise SystemExit("worker: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --url / --api-key)")
    queue = JobQueue(settings.redis_url, settings.job_chunk_tasks)
    try:
        queue.workers()  # Redis reachable: say so now, before the model loads
        api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key)
        set_cpu_threads(args.threads)
        loaded = load_configured_model(settings)
    except QueueUnavailable as e:
        raise SystemExit(f"worker: {e.message}") from None
    except (LabelStudioAPIError, ModelUnavailable) as e:
        raise SystemExit(f"worker: {e}") from None
    except Exception as e:  # the SDK refuses an expired token while constructing
        raise SystemExit(
            f"worker: cannot use Label Studio at {settings.label_studio_url}: {describe(e)}"
        ) from None
    runtime = runtime_for(settings, loaded=loaded)
    name = args.name or f"{socket.gethostname()}.{os.getpid()}.{loaded.device}"
    worker.work(settings, runtime, JobRunner(runtime, api, queue), queue, name, args.burst)
