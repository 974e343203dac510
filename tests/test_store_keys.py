"""One store key for every reader and writer (label_studio_sam2.engine.models.store_key): `warm`, the server, a
fine-tuned decoder and the video tracker find what the others stored, in the same model and
precision, and never what another precision computed."""

from __future__ import annotations

import pytest
import torch

from label_studio_sam2.engine.image import ImagePredictor
from label_studio_sam2.engine.models import LoadedModel, encoder_precision, load_image_model, store_key
from label_studio_sam2.engine.store import EmbeddingStore
from tests.conftest import BOTH_PRECISIONS, keypoint, noise_image, predict_body


@pytest.fixture
def project(media_server):
    """A Label Studio project of three images (one task without an image), in memory."""
    from tests.test_preannotate import FakeLabelStudio

    urls = [media_server.add_image(f"p{i}.png", noise_image(40, 56, seed=i)) for i in range(3)]
    tasks = [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(urls)] + [{"id": 9, "data": {}}]
    return FakeLabelStudio(tasks=tasks), urls


def _warm(store, api, loaded):
    from label_studio_sam2.labelstudio.warm import warm_project
    from label_studio_sam2.service.settings import Settings

    return warm_project(Settings.from_env(store_dir=str(store)), 1, api=api, loaded=loaded, progress=False)


@BOTH_PRECISIONS
def test_warm_twice_encodes_nothing_the_second_time_and_the_server_finds_it(
    project, tiny_model, cpu_precision, tmp_path, app_factory
):
    api, urls = project
    store = tmp_path / "store"
    first = _warm(store, api, tiny_model)
    assert (first.encoded, first.skipped, first.failed) == (3, 0, {})
    assert f"encoder precision {cpu_precision}" in first.keyed_by()
    again = _warm(store, api, tiny_model)
    assert (again.encoded, again.skipped) == (0, 3)
    (store / "urls.jsonl").unlink()  # no URL index: each image is downloaded, then found stored
    assert (_warm(store, api, tiny_model).encoded, len(list(store.rglob("*.emb")))) == (0, 3)

    # a server on that store answers the first click on each image without its encoder
    app = app_factory(store_dir=str(store))
    client = app.test_client()
    for i, url in enumerate(urls):
        body = predict_body([{"id": i + 1, "data": {"image": url}}], [keypoint(30, 40, w=56, h=40)])
        resp = client.post("/predict", json=body)
        assert resp.status_code == 200 and resp.get_json()["results"][0]["result"]
    runtime = app.extensions["sam2"]
    assert runtime.segmenter.predictor.encoder_calls == 0 and runtime.store.hits == 3


def test_another_precision_encodes_again_and_keeps_its_own_entries(project, tiny_model_dir, tmp_path):
    api, _ = project
    store = tmp_path / "store"
    fp32 = load_image_model(str(tiny_model_dir), "cpu", "fp32")
    bf16 = load_image_model(str(tiny_model_dir), "cpu", "bf16")
    assert _warm(store, api, fp32).encoded == 3
    switched = _warm(store, api, bf16)  # e.g. CPU_PRECISION changed, or another CPU
    assert switched.encoded == 3 and "encoder precision bf16" in switched.keyed_by()
    assert len(list(store.rglob("*.emb"))) == 6
    assert (_warm(store, api, fp32).encoded, _warm(store, api, bf16).encoded) == (0, 0)


@BOTH_PRECISIONS
def test_a_fine_tuned_decoder_finds_the_embeddings_its_base_stored(tiny_model, tmp_path):
    from label_studio_sam2.engine.finetune import view_of, with_decoder

    img = noise_image(40, 56)
    ImagePredictor(tiny_model, store=EmbeddingStore(tmp_path)).embedding("img", img)
    tuned = view_of(tiny_model, with_decoder(tiny_model.model))
    assert encoder_precision(tuned) == encoder_precision(tiny_model)
    predictor = ImagePredictor(tuned, store=EmbeddingStore(tmp_path))
    predictor.embedding("img", img)
    assert predictor.encoder_calls == 0  # the same encoder in the same precision: the same entry


def test_keys_name_model_and_precision_and_keep_the_keys_stores_already_hold(tiny_model_dir):
    cpu_fp32 = load_image_model(str(tiny_model_dir), "cpu", "fp32")
    cpu_bf16 = load_image_model(str(tiny_model_dir), "cpu", "bf16")
    mid = cpu_fp32.model_id
    # entries written before this function existed are still found
    assert store_key(cpu_fp32, "img") == f"{mid}:img"
    assert store_key(cpu_bf16, "img") == f"{mid}:bf16:img"
    # a GPU's autocast features (stored before under the fp32 key) have keys of their own
    gpu = [
        LoadedModel(cpu_fp32.model, "x", mid, torch.device("cuda"), 64, autocast=dtype)
        for dtype in (torch.bfloat16, torch.float16)
    ]
    keys = {store_key(m, "img") for m in [cpu_fp32, cpu_bf16, *gpu]}
    assert keys == {f"{mid}:img", f"{mid}:bf16:img", f"{mid}:cuda-bf16:img", f"{mid}:cuda-fp16:img"}


def test_an_openvino_encoder_has_keys_of_its_own_and_torch_keys_stay(tiny_model_dir):
    """ENCODER_RUNTIME=openvino: its features are not bitwise PyTorch's, so its entries are kept
    apart per precision (tests/test_openvino.py checks this through a store, with real models)."""
    from label_studio_sam2.engine.openvino_encoder import OpenVINOVisionEncoder

    fp32 = load_image_model(str(tiny_model_dir), "cpu", "fp32", "torch")
    bf16 = load_image_model(str(tiny_model_dir), "cpu", "bf16", "torch")
    mid = fp32.model_id
    ov = {}
    for hint, base in (("f32", fp32), ("bf16", bf16)):
        ov[hint] = LoadedModel(base.model, base.source, mid, base.device, base.image_size)
        ov[hint].cpu_encoder_autocast = base.cpu_encoder_autocast
        ov[hint].ov_encoder = OpenVINOVisionEncoder(None, hint, 2, None, None)
    assert store_key(ov["f32"], "img") == f"{mid}:ov-f32:img"
    assert store_key(ov["bf16"], "img") == f"{mid}:ov-bf16:img"
    assert (store_key(fp32, "img"), store_key(bf16, "img")) == (f"{mid}:img", f"{mid}:bf16:img")
