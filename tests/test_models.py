"""Model names, devices and the message a user gets when weights are missing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from label_studio_sam2.engine import models


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, "facebook/sam2.1-hiera-tiny"),
        ("tiny", "facebook/sam2.1-hiera-tiny"),
        ("sam2.1-large", "facebook/sam2.1-hiera-large"),
        ("sam2-small", "facebook/sam2-hiera-small"),
        ("sam2-base-plus", "facebook/sam2-hiera-base-plus"),
        ("sam2.1_hiera_base_plus", "facebook/sam2.1-hiera-base-plus"),
        ("sam2.1-b+", "facebook/sam2.1-hiera-base-plus"),
        ("facebook/sam2-hiera-large", "facebook/sam2-hiera-large"),
        ("someone/sam2-finetuned", "someone/sam2-finetuned"),
    ],
)
def test_short_names_and_hub_ids(spec, expected):
    assert models.resolve(spec) == expected


def test_a_directory_is_used_as_is(tiny_model_dir):
    assert models.resolve(str(tiny_model_dir)) == str(tiny_model_dir)


def test_nonsense_name_is_refused_with_the_accepted_forms():
    with pytest.raises(models.ModelUnavailable, match="short name"):
        models.resolve("sam3-huge")


def test_missing_weights_offline_say_how_to_provide_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    start = time.monotonic()
    with pytest.raises(models.ModelUnavailable) as e:
        models.load_image_model("sam2.1-small", "cpu")
    message = str(e.value)
    assert "facebook/sam2.1-hiera-small" in message
    for way in ("--model", ".pt", "HF_HOME", "make-test-model"):
        assert way in message
    assert time.monotonic() - start < 15  # no long retry loop against an unreachable hub


def test_device_auto_and_autocast_choice():
    dev = models.pick_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else dev.type)
    assert models.autocast_dtype(torch.device("cpu")) is None  # fp32 on CPU (bf16 is 11x slower here)
    if not torch.cuda.is_available():
        with pytest.raises(models.ModelUnavailable, match="CUDA"):
            models.pick_device("cuda")


def test_image_and_video_models_load_from_one_directory_and_share_the_encoder(tiny_model_dir):
    image = models.load_image_model(str(tiny_model_dir), "cpu")
    video = models.load_video_model(str(tiny_model_dir), "cpu", share_with=image)
    assert image.image_size == video.image_size == 256  # read from the config, not assumed 1024
    assert video.model.vision_encoder is image.model.vision_encoder
    assert video.lock is image.lock
    assert image.model_id == models.load_image_model(str(tiny_model_dir), "cpu").model_id


def test_make_test_model_writes_a_loadable_model_random_or_trained(tmp_path):
    import subprocess
    import sys

    for extra, size in (([], 256), (["--trained"], 128)):
        out = tmp_path / ("trained" if extra else "random")
        proc = subprocess.run(
            [sys.executable, "-m", "label_studio_sam2", "make-test-model", str(out), *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"--model {out}" in proc.stdout
        loaded = models.load_image_model(str(out), "cpu")
        assert loaded.image_size == size
        video = models.load_video_model(str(out), "cpu", share_with=loaded)
        assert video.image_size == size


def test_cpu_precision_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda native=native: native)
        assert models.cpu_encoder_dtype(cpu, "auto") == (torch.bfloat16 if native else None)
        assert models.cpu_encoder_dtype(cpu, "fp32") is None
        assert models.cpu_encoder_dtype(cpu, "bf16") == torch.bfloat16
        assert models.cpu_encoder_dtype(cuda, "auto") is None  # GPUs: autocast_dtype decides
    with pytest.raises(ValueError, match="CPU_PRECISION"):
        models.cpu_encoder_dtype(cpu, "fp16")


def test_the_engine_takes_its_precision_as_an_argument_not_from_the_environment(monkeypatch):
    """The engine reads no environment: CPU_PRECISION reaches it through Settings and the service
    (load_configured_model); a direct caller gets fp32 unless it asks."""
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("CPU_PRECISION", "bf16")
    assert models.cpu_encoder_dtype(torch.device("cpu")) is None


def test_the_service_passes_cpu_precision_and_the_hub_settings_to_the_engine(tiny_model_dir, monkeypatch):
    from label_studio_sam2.service.runtime import load_configured_model
    from label_studio_sam2.service.settings import Settings

    monkeypatch.setenv("CPU_PRECISION", "bf16")
    loaded = load_configured_model(Settings.from_env(model=str(tiny_model_dir), device="cpu"))
    assert loaded.cpu_encoder_autocast == torch.bfloat16
    # HF_HUB_OFFLINE=1: a model missing locally fails at once, the hub never contacted
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: pytest.fail("contacted the hub"))
    with pytest.raises(models.ModelUnavailable):
        load_configured_model(Settings.from_env(model="facebook/sam2.1-hiera-nonexistent", device="cpu"))


def test_native_bf16_is_read_from_the_cpu():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    assert models.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_a_checkpoint_in_a_read_only_folder_is_converted_where_the_caller_says(tmp_path, monkeypatch):
    """SAM2_CONVERTED_DIR reaches `resolve` as an argument (Settings.converted_dir); the engine
    itself never reads the variable."""
    ckpt = tmp_path / "ro" / "sam2.1_hiera_tiny.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not read: conversion is recorded, not run")
    converted = []
    monkeypatch.setattr(models, "convert_checkpoint", lambda src, out: converted.append(Path(out)))
    monkeypatch.setattr(
        models.os, "access", lambda path, mode: False
    )  # a read-only mount (root writes anywhere)
    monkeypatch.setenv("SAM2_CONVERTED_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default: ~/.cache/label-studio-sam2
    assert models.resolve(str(ckpt), tmp_path / "given") == str(tmp_path / "given" / "sam2.1_hiera_tiny-hf")
    assert models.resolve(str(ckpt)) == str(
        Path.home() / ".cache" / "label-studio-sam2" / "sam2.1_hiera_tiny-hf"
    )
    assert converted == [
        tmp_path / "given" / "sam2.1_hiera_tiny-hf",
        Path.home() / ".cache" / "label-studio-sam2" / "sam2.1_hiera_tiny-hf",
    ]
