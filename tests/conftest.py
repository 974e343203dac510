"""Shared fixtures and region builders: tiny in-process models, a loopback media server, an app
around a model, Label Studio regions in percent or pixels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from devkit.media_server import MediaServer, encode_image  # noqa: F401  (tests import encode_image here)

torch.set_num_threads(2)
# The embedding store is on by default (under the user's cache directory). Tests share no store
# and never write to the home directory: those about the store give it a directory of their own.
os.environ["EMBEDDING_STORE_DIR"] = "off"
# The encoder's precision is an input like any other: CPU_PRECISION=auto picks bf16 on a CPU with
# native bf16 (AVX-512 BF16, AMX) and fp32 elsewhere, so a test must not leave it to the machine.
# Every test runs under the `cpu_precision` fixture's value (fp32 unless asked), set in the
# environment for the test and the processes it starts; `@pytest.mark.cpu_precision("fp32",
# "bf16")` runs a test (or a module, as `pytestmark`) once per value. bf16 autocast runs on any
# x86 CPU: natively where the CPU has it, emulated (slower) elsewhere.
os.environ["CPU_PRECISION"] = "fp32"
BOTH_PRECISIONS = pytest.mark.cpu_precision("fp32", "bf16")
# The encoder's runtime likewise: ENCODER_RUNTIME=auto picks OpenVINO where the package is installed
# (as requirements.txt installs it); the suite runs PyTorch's encoder, and tests/test_openvino.py
# asks for OpenVINO itself.
os.environ["ENCODER_RUNTIME"] = "torch"

IMAGE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/><Label value="car"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="object"/><Label value="car"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="object"/><Label value="car"/></RectangleLabels>
</View>"""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random SAM2 saved in HF format, as `make-test-model` writes it."""
    from label_studio_sam2.engine.models import write_test_model

    return write_test_model(tmp_path_factory.mktemp("tiny-sam2"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cpu_precision(*values): run the test once with CPU_PRECISION forced to each value "
        "(fp32, bf16; default fp32): the cpu_precision fixture, tiny_model's precision",
    )


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("cpu_precision")
    if marker is not None and "cpu_precision" in metafunc.fixturenames:
        metafunc.parametrize("cpu_precision", list(marker.args), indirect=True, scope="session")


@pytest.fixture(scope="session")
def cpu_precision(request) -> str:
    """The CPU_PRECISION this test runs under: fp32, or each value of its cpu_precision mark."""
    return getattr(request, "param", "fp32")


@pytest.fixture(autouse=True)
def _cpu_precision_env(cpu_precision, monkeypatch):
    """CPU_PRECISION in the environment: for Settings, load_image_model and spawned processes."""
    monkeypatch.setenv("CPU_PRECISION", cpu_precision)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir, cpu_precision):
    """The tiny model, its encoder in the test's CPU_PRECISION (forced, whatever the CPU)."""
    from label_studio_sam2.engine.models import load_image_model

    loaded = load_image_model(str(tiny_model_dir), "cpu", cpu_precision)
    assert (loaded.cpu_encoder_autocast is not None) == (cpu_precision == "bf16")
    return loaded


@pytest.fixture(autouse=True)
def _loopback_media_is_trusted(monkeypatch):
    """The suite's media servers live on 127.0.0.1, which the default fetch policy refuses; trust
    that one address here (an explicit test override, the default stays closed). The security
    tests serve from 127.0.0.2 and up, which stay untrusted."""
    from label_studio_sam2.service import media

    monkeypatch.setattr(media, "TRUSTED_FOR_TESTS", {"127.0.0.1"})


@pytest.fixture(autouse=True)
def _no_prefetch_unless_asked(monkeypatch):
    """PREFETCH_TASKS is on by default on CPU: a test app with LS credentials would start `warm`
    processes after its clicks. Tests of the prefetcher set it themselves."""
    monkeypatch.setenv("PREFETCH_TASKS", "0")


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port (devkit.redis_server): url, stop(), start()."""
    from devkit.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.close()


@pytest.fixture
def media_server(tmp_path):
    """Files on a loopback host (devkit.media_server on pytest-httpserver): add(), add_image()."""
    server = MediaServer(tmp_path).serve_files()
    yield server
    server.close()


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def app_factory(tiny_model):
    """Build an app around the tiny model with settings overrides."""
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.service.settings import Settings

    def make(**overrides):
        settings = Settings.from_env(**overrides)
        return create_app(settings, loaded_model=tiny_model)

    return make


@pytest.fixture
def client(app_factory):
    return app_factory().test_client()


def keypoint(
    x: float, y: float, label: str = "object", positive: bool | None = True, w: int = 64, h: int = 48
) -> dict:
    """A smart keypoint region as the 1.23 UI sends it (percent coordinates)."""
    region = {
        "id": f"kp{x:.0f}_{y:.0f}",
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "origin": "manual",
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label], "labels": [label]},
    }
    if positive is not None:
        region["is_positive"] = positive
    return region


def rectangle(x, y, width, height, label="object", rotation=0, w=64, h=48) -> dict:
    return {
        "id": f"r{x:.0f}_{y:.0f}",
        "type": "rectanglelabels",
        "from_name": "box",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": rotation,
            "rectanglelabels": [label],
        },
    }


def rect_px(box, w: int, h: int, label: str = "object", region_id: str | None = None) -> dict:
    """`rectangle` for a pixel box (x1, y1, x2, y2) of a w x h image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    region = rectangle(100 * x1 / w, 100 * y1 / h, 100 * (x2 - x1) / w, 100 * (y2 - y1) / h, label, w=w, h=h)
    region["id"] = region_id or f"r{x1:.0f}_{y1:.0f}"
    return region


def click_px(xy, hw: tuple[int, int], positive: bool = True) -> dict:
    """`keypoint` at continuous pixel `xy` of an (H, W) image."""
    h, w = hw
    region = keypoint(xy[0] / w * 100, xy[1] / h * 100, positive=positive, w=w, h=h)
    region["id"] = f"kp{xy[0]:.1f}_{xy[1]:.1f}"
    return region


def predict_body(tasks: list[dict], regions: list[dict] | None, config: str = IMAGE_CONFIG) -> dict:
    return {
        "tasks": tasks,
        "project": "1.1795498385",
        "label_config": config,
        "params": {
            "login": None,
            "password": None,
            "context": {"result": regions} if regions is not None else None,
        },
    }


def decode_brush(result: dict) -> np.ndarray:
    """A brushlabels result -> (H, W) bool mask, with the SDK's reference decoder."""
    from label_studio_sdk.converter.brush import decode_rle

    h, w = result["original_height"], result["original_width"]
    flat = np.asarray(decode_rle(result["value"]["rle"]))
    assert flat.size == h * w * 4, f"RLE holds {flat.size} bytes, the image needs {h * w * 4}"
    return flat.reshape(h, w, 4)[:, :, 3] > 0
