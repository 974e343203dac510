"""One way to hand off background work (label_studio_sam2.service.handoff): whatever runs the
server's work is given the server's effective settings, not what the environment says."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from label_studio_sam2.cli.main import build_parser
from label_studio_sam2.service.settings import Settings

FIXTURE = Path(__file__).resolve().parent.parent / "devkit" / "sam2-shapes"
TOKEN = "tok-" + "s" * 36


@pytest.fixture
def recording_python(tmp_path, monkeypatch):
    """`sys.executable` replaced by a script that records its argv and environment, so what the
    server would start as a child (`python -m label_studio_sam2 warm|train ...`) is seen as the
    child sees it, without loading a model."""
    record = tmp_path / "child.json"
    script = tmp_path / "python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], 'env': dict(os.environ)}}))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(script))

    def seen(timeout_s: float = 60.0) -> dict:
        end = time.monotonic() + timeout_s
        while not record.exists() and time.monotonic() < end:
            time.sleep(0.05)
        return json.loads(record.read_text())

    return seen


@pytest.fixture
def gpu_environment(monkeypatch, tmp_path):
    """An environment that says GPU, bf16 and another model: what a `serve` flag must override."""
    monkeypatch.setenv("DEVICE", "cuda:7")
    monkeypatch.setenv("CPU_PRECISION", "bf16")
    monkeypatch.setenv("ENCODER_RUNTIME", "openvino")
    monkeypatch.setenv("SAM2_MODEL", "facebook/sam2.1-hiera-large")
    monkeypatch.setenv("SAM2_FINETUNE_DIR", str(tmp_path / "elsewhere"))


def _serve_settings(*flags: str, **more) -> Settings:
    """The server's Settings for `label-studio-sam2 serve FLAGS` (as cmd_serve builds them)."""
    args = build_parser().parse_args(["serve", *flags])
    return Settings.from_env(
        model=args.model, device=args.device, encoder_runtime=args.encoder_runtime, **more
    )


def test_serve_device_flag_reaches_the_prefetch_warm_child(gpu_environment, recording_python, tmp_path):
    from label_studio_sam2.service.prefetch import Prefetcher

    settings = _serve_settings(
        "--device",
        "cpu",
        "--model",
        str(FIXTURE),
        "--encoder-runtime",
        "torch",
        prefetch_tasks=2,
        store_dir=str(tmp_path / "store"),
        label_studio_url="http://ls.example:8080",
        label_studio_api_key=TOKEN,
        cpu_precision="fp32",
    )
    prefetcher = Prefetcher(settings, str(FIXTURE))
    assert prefetcher.after_click(1, 10)
    child = recording_python()
    env = child["env"]
    # the device, model, precision and runtime the server runs with, not the environment's GPU
    assert env["DEVICE"] == "cpu"
    assert env["SAM2_MODEL"] == str(FIXTURE)
    assert env["CPU_PRECISION"] == "fp32"
    assert env["ENCODER_RUNTIME"] == "torch"
    assert env["EMBEDDING_STORE_DIR"] == str(tmp_path / "store")
    assert env["LABEL_STUDIO_URL"] == "http://ls.example:8080"
    assert env["LABEL_STUDIO_API_KEY"] == TOKEN  # the token in the environment only...
    assert not any(TOKEN in a for a in child["argv"])  # ...never in argv, which `ps` shows
    assert child["argv"][:3] == ["-m", "label_studio_sam2", "warm"]


def test_serve_settings_reach_the_training_child(gpu_environment, recording_python, tmp_path):
    from label_studio_sam2.service.finetuned import TrainingLauncher

    settings = _serve_settings(
        "--device",
        "cpu",
        "--model",
        str(FIXTURE),
        finetune_dir=str(tmp_path / "finetuned"),
        label_studio_url="http://ls.example:8080",
        label_studio_api_key=TOKEN,
        cpu_precision="fp32",
        store_dir="off",
    )
    launcher = TrainingLauncher(settings)
    started = launcher.start(3, str(FIXTURE))
    assert started["status"] == "training"
    child = recording_python()
    env = child["env"]
    assert env["DEVICE"] == "cpu" and env["CPU_PRECISION"] == "fp32"
    assert env["SAM2_MODEL"] == str(FIXTURE)
    assert env["SAM2_FINETUNE_DIR"] == str(tmp_path / "finetuned")
    assert env["EMBEDDING_STORE_DIR"] == "off"  # the server's store is off: so is the child's
    assert env["LABEL_STUDIO_API_KEY"] == TOKEN
    assert not any(TOKEN in a for a in child["argv"])
    assert launcher.wait(3, 60) == 0


def test_an_rq_job_carries_the_servers_settings_and_a_worker_of_another_model_refuses_it():
    from label_studio_sam2.service.handoff import job_refusal, job_settings

    settings = Settings.from_env(device="cpu", cpu_precision="fp32", video_max_frames=7, model="tiny")
    carried = job_settings(settings, "sam2.1-hiera-tiny")
    assert carried["model"] == "sam2.1-hiera-tiny" and carried["video_max_frames"] == 7
    assert carried["device"] == "cpu" and carried["cpu_precision"] == "fp32"
    json.dumps(carried)  # it goes to Redis as JSON
    assert not any(TOKEN in str(v) for v in carried.values())
    assert job_refusal(carried, "sam2.1-hiera-tiny") is None
    why = job_refusal(carried, "sam2.1-hiera-large")
    assert why and "sam2.1-hiera-tiny" in why and "SAM2_MODEL" in why
    assert job_refusal({}, "sam2.1-hiera-large") is None  # a job queued before: the worker's own, as before


def test_jobs_the_server_queues_carry_its_settings_and_a_worker_of_another_model_refuses_them(
    app_factory, redis_server
):
    from dataclasses import replace

    from label_studio_sam2.labelstudio.jobs import JobRunner
    from label_studio_sam2.service.handoff import video_limits
    from label_studio_sam2.service.jobqueue import chunk_from_job
    from tests.conftest import IMAGE_CONFIG
    from tests.test_preannotate import FakeLabelStudio

    app = app_factory(
        redis_url=redis_server.url,
        video_max_frames=7,
        cpu_precision="fp32",
        label_studio_url="http://ls.example:8080",
        label_studio_api_key=TOKEN,
    )
    runtime = app.extensions["sam2"]
    runtime.require()
    queue = runtime.job_queue()
    queue.start_run(
        [1, 2], project=1, label_config="", options={"mode": "boxes"}, model_version="", source="retrieve"
    )
    [job] = queue.queue.jobs
    assert TOKEN not in json.dumps(job.args)  # the token never goes to Redis
    chunk = chunk_from_job(job.args[0])
    assert chunk.settings["model"] == runtime.image_model.model_id
    assert chunk.settings["video_max_frames"] == 7 and chunk.settings["cpu_precision"] == "fp32"
    # a worker started with the default VIDEO_MAX_FRAMES tracks as far as the server would
    worker_settings = Settings.from_env()
    assert worker_settings.video_max_frames != 7
    assert video_limits(worker_settings, chunk.settings)["max_frames"] == 7
    assert (
        video_limits(worker_settings, {"video_max_frames": "9; rm"})["max_frames"] != 9
    )  # not a number: its own
    # a worker serving another model refuses the run: nothing written, the reason recorded
    ls = FakeLabelStudio(config=IMAGE_CONFIG, tasks=[{"id": 1, "data": {}}, {"id": 2, "data": {}}])
    other = replace(chunk, settings={**chunk.settings, "model": "sam2.1-hiera-large"})
    assert JobRunner(runtime, ls, queue).run(other) == {"failed": 2}
    assert ls.writes == 0 and not ls.posted
    [(why, n)] = queue.status(chunk.run).why["failed"].items()
    assert n == 2 and "sam2.1-hiera-large" in why and "SAM2_MODEL" in why


def test_a_worker_says_which_of_the_servers_settings_it_runs_with_its_own(app_factory, redis_server, caplog):
    from label_studio_sam2.labelstudio.jobs import JobRunner
    from label_studio_sam2.service.jobqueue import chunk_from_job
    from tests.test_preannotate import FakeLabelStudio

    app = app_factory(redis_url=redis_server.url, cpu_precision="fp32")
    runtime = app.extensions["sam2"]
    runtime.require()
    queue = runtime.job_queue()
    run = queue.start_run(
        [1], project=1, label_config="", options={}, model_version="", source="warm", kind="warm"
    )
    [job] = queue.queue.jobs
    chunk = chunk_from_job(job.args[0])
    chunk.settings["cpu_precision"] = "bf16"  # as a server on another CPU would have queued it
    with caplog.at_level("INFO", "label_studio_sam2.service.worker"):
        JobRunner(runtime, FakeLabelStudio(tasks=[{"id": 1, "data": {}}]), queue).run(chunk)
    said = [r.getMessage() for r in caplog.records if run.id in r.getMessage()]
    assert any("CPU_PRECISION=bf16 (worker: fp32)" in line for line in said), said


def test_the_prefetch_child_runs_only_on_idle_cpu_and_the_training_child_at_nice_10(tmp_path):
    """Prefetch (nice 19) also gets SCHED_IDLE, inherited by every thread it starts (OpenVINO's
    and torch's pools), so an encoding prefetch does not slow a click's encoder; training (nice 10)
    stays an ordinary process."""
    from label_studio_sam2.service.handoff import spawn

    probe = (
        "import os, threading, json\n"
        "seen = {}\n"
        "t = threading.Thread(target=lambda: seen.update(thread=os.sched_getscheduler(0)))\n"
        "t.start(); t.join()\n"
        "print(json.dumps({'nice': os.nice(0), 'policy': os.sched_getscheduler(0), **seen}))\n"
    )
    base = os.nice(0)
    for niceness, policy in ((19, os.SCHED_IDLE), (10, os.SCHED_OTHER)):
        out = tmp_path / f"nice{niceness}.json"
        with out.open("w") as f:
            proc = spawn([sys.executable, "-c", probe], dict(os.environ), niceness=niceness, stdout=f)
            assert proc.wait(30) == 0
        got = json.loads(out.read_text())
        assert got == {"nice": min(base + niceness, 19), "policy": policy, "thread": policy}, got
