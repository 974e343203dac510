"""The persistent embedding store: first click without the encoder, safety on disk."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from label_studio_sam2.engine.image import EmbeddingCache, ImagePredictor, Prompt
from label_studio_sam2.engine.models import store_key
from label_studio_sam2.engine.store import EmbeddingStore
from tests.conftest import BOTH_PRECISIONS, noise_image

pytestmark = BOTH_PRECISIONS  # the store's keys name the encoder's precision: both are exercised


def click(x, y):
    return [Prompt(np.array([[x, y]], np.float32), np.array([1]))]


def test_pre_encoded_image_needs_no_encoder_after_a_restart(tiny_model, tmp_path):
    img = noise_image(60, 80)
    warm = ImagePredictor(tiny_model, EmbeddingCache(), EmbeddingStore(tmp_path))
    warm.embedding("img", img)
    (fresh,) = warm.predict("img", img, click(30, 20))

    # a new process: empty memory cache, same directory
    server = ImagePredictor(tiny_model, EmbeddingCache(), EmbeddingStore(tmp_path))

    def must_not_decode():
        raise AssertionError("the image was decoded although its embedding is stored")

    (from_store,) = server.predict("img", must_not_decode, click(30, 20))
    assert server.encoder_calls == 0 and server.store.hits == 1
    # fp16 on disk: the mask may differ only in a few boundary pixels
    agree = (from_store.mask == fresh.mask).mean()
    assert agree > 0.995
    assert from_store.score == pytest.approx(fresh.score, abs=0.01)


def test_store_is_fp16_and_bounded_lru(tiny_model, tmp_path):
    probe = ImagePredictor(tiny_model).embedding("p", noise_image(8, 8))
    store = EmbeddingStore(tmp_path, max_bytes=10**12)
    store.put("a", probe)
    one = store.bytes
    assert one < probe.nbytes * 0.6  # half of fp32, plus a small header
    store = EmbeddingStore(tmp_path, max_bytes=int(2.5 * one))
    store.put("b", probe)
    past = time.time() - 100
    os.utime(store.path("a"), (past, past))  # a is the least recently used
    store.put("c", probe)
    assert "a" not in store and "b" in store and "c" in store
    assert store.bytes <= store.max_bytes
    assert EmbeddingStore(tmp_path).bytes == store.bytes  # a restart counts the same bytes


def test_tensors_come_back_exactly_in_their_dtype_and_layout(tmp_path):
    # Video frame features are stored as computed: fp32 on CPU, bf16 under a GPU's autocast, in
    # the layout the encoder left them (a level of SAM2's features is a transposed view).
    import torch

    store = EmbeddingStore(tmp_path)
    tensors = [
        torch.randn(1, 16, 1024).permute(2, 0, 1),
        torch.randn(256, 1, 32).to(torch.bfloat16),
        torch.randn(2, 3, 4, 5).half().to(memory_format=torch.channels_last),
    ]
    assert store.put_tensors("frame", tensors, {"frame": 7})
    back, fields = EmbeddingStore(tmp_path).get_tensors("frame")
    assert fields["frame"] == 7
    for put, got in zip(tensors, back, strict=True):
        assert got.dtype == put.dtype and got.stride() == put.stride() and torch.equal(got, put)


def test_entries_written_before_dtypes_were_recorded_still_read(tmp_path):
    import hashlib
    import json
    import struct

    import torch

    from label_studio_sam2.engine.store import MAGIC

    features = [torch.randn(1, 8, 4, 4).half(), torch.randn(1, 4, 2, 2).half()]
    payload = b"".join(f.numpy().tobytes() for f in features)
    header = {"hw": [30, 40], "shapes": [[1, 8, 4, 4], [1, 4, 2, 2]], "dtype": "float16"}
    header["sha256"] = hashlib.sha256(payload).hexdigest()
    data = json.dumps(header).encode()
    store = EmbeddingStore(tmp_path)
    store.path("old").parent.mkdir(parents=True)
    store.path("old").write_bytes(MAGIC + struct.pack("<I", len(data)) + data + payload)
    emb = store.get("old")
    assert emb.original_hw == (30, 40)
    assert all(torch.equal(got, f.float()) for got, f in zip(emb.features, features, strict=True))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_entry_is_detected_and_re_encoded(tiny_model, tmp_path, damage):
    img = noise_image(30, 30)
    ImagePredictor(tiny_model, store=EmbeddingStore(tmp_path)).embedding("img", img)
    path = EmbeddingStore(tmp_path).path(store_key(tiny_model, "img"))
    assert path.is_file()
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data = bytearray(data)
        data[-100] ^= 0xFF
        data = bytes(data)
    elif damage == "garbage":
        data = b"not an embedding at all"
    else:
        data = b""
    path.write_bytes(data)
    server = ImagePredictor(tiny_model, store=EmbeddingStore(tmp_path))
    (m,) = server.predict("img", img, click(10, 10))
    assert m.mask.shape == (30, 30)
    assert server.encoder_calls == 1 and server.store.corrupt == 1
    assert EmbeddingStore(tmp_path).get(store_key(tiny_model, "img")) is not None  # re-stored, whole


def test_disk_full_does_not_fail_the_click(tiny_model, tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("label_studio_sam2.engine.store.tempfile.mkstemp", full)
    pred = ImagePredictor(tiny_model, store=store)
    (m,) = pred.predict("img", noise_image(20, 20), click(5, 5))
    assert m.mask.shape == (20, 20)
    assert store.write_errors == 1 and store.bytes == 0
    assert not list(tmp_path.rglob("*.tmp-*"))


def _writer(directory: str, worker: int, rounds: int, queue) -> None:
    import torch

    from label_studio_sam2.engine.image import ImageEmbedding

    store = EmbeddingStore(directory)
    bad = 0
    for i in range(rounds):
        value = float(worker * 1000 + i)
        emb = ImageEmbedding.of(
            [torch.full((1, 8, 16, 16), value), torch.full((1, 4, 8, 8), value)], (10, 20)
        )
        store.put("shared", emb)
        store.put(f"own-{worker}-{i % 3}", emb)
        got = store.get("shared")
        if got is None or len({float(f.flatten()[0]) for f in got.features}) != 1:
            bad += 1  # absent, corrupt, or a mix of two writers' bytes
    queue.put(bad)


def test_concurrent_writers_in_several_processes_never_corrupt(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40, queue)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sum(queue.get() for _ in procs) == 0
    store = EmbeddingStore(tmp_path)
    assert store.get("shared") is not None and store.corrupt == 0
    assert not list(tmp_path.rglob(".tmp-*"))


def test_another_writers_temporary_file_is_neither_counted_nor_evicted(tiny_model, tmp_path):
    emb = ImagePredictor(tiny_model).embedding("p", noise_image(8, 8))
    half_written = tmp_path / "ab" / ".tmp-other-writer.emb"
    half_written.parent.mkdir()
    half_written.write_bytes(b"x" * 1000)
    store = EmbeddingStore(tmp_path, max_bytes=10)  # everything is over the bound
    assert store.bytes == 0
    store.put("a", emb)
    assert half_written.exists()  # its writer will still rename it into place


def test_store_is_on_by_default_under_the_users_cache_and_survives_a_restart(
    tiny_model, tmp_path, monkeypatch, media_server
):
    """Nothing configured: the second server process clicks on a seen image without encoding."""
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.service.settings import Settings
    from tests.conftest import keypoint, predict_body

    monkeypatch.delenv("EMBEDDING_STORE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = Settings.from_env()
    assert settings.store_dir == str(tmp_path / "cache" / "label-studio-sam2" / "embeddings")
    url = media_server.add_image("a.png", noise_image(48, 64))
    body = predict_body([{"id": 1, "data": {"image": url}}], [keypoint(40, 50)])
    first = create_app(settings, loaded_model=tiny_model)
    assert first.test_client().post("/predict", json=body).status_code == 200
    assert first.extensions["sam2"].segmenter.predictor.encoder_calls == 1

    restarted = create_app(Settings.from_env(), loaded_model=tiny_model)
    resp = restarted.test_client().post("/predict", json=body)
    assert resp.status_code == 200 and resp.get_json()["results"][0]["result"]
    assert restarted.extensions["sam2"].segmenter.predictor.encoder_calls == 0


@pytest.mark.parametrize("off", ["off", "OFF", "none"])
def test_store_off_disables_it(monkeypatch, off):
    from label_studio_sam2.service.settings import Settings

    monkeypatch.setenv("EMBEDDING_STORE_DIR", off)
    assert Settings.from_env().store_dir is None
    assert Settings.from_env(store_dir="off").store_dir is None


def test_an_unwritable_default_store_only_costs_re_encoding(tiny_model, tmp_path, monkeypatch):
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.service.settings import Settings

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    app = create_app(Settings.from_env(store_dir=str(blocker / "sub")), loaded_model=tiny_model)
    assert app.extensions["sam2"].store is None and app.extensions["sam2"].segmenter is not None
    assert app.test_client().get("/health").status_code == 200
