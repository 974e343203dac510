"""ENCODER_RUNTIME=openvino: the image encoder on OpenVINO gives PyTorch's features (f32) or stays
within the bf16 bounds (bf16), the same masks, a cache made once and rebuilt when corrupt, and a
fallback to PyTorch whenever OpenVINO cannot serve.

The suite runs PyTorch's encoder (conftest: ENCODER_RUNTIME=torch); this module asks for OpenVINO.
Each conversion of the trained fixture costs a few seconds: the module converts it once per
precision and the cache tests reuse or copy those entries where they can.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading

import pytest
import torch

from devkit.scenes import make_scene, scene_prompts
from label_studio_sam2.engine import openvino_encoder as ove
from label_studio_sam2.engine.image import ImagePredictor
from label_studio_sam2.engine.models import load_image_model, store_key
from label_studio_sam2.engine.store import EmbeddingStore
from label_studio_sam2.engine.transforms import preprocess
from tests.test_behaviour import FIXTURE

pytestmark = pytest.mark.cpu_precision("fp32")  # each test loads the precisions it compares


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture(scope="module")
def models(ov_cache):
    """The trained fixture four ways: {(runtime, precision): LoadedModel}."""
    out = {}
    for precision in ("fp32", "bf16"):
        out["torch", precision] = load_image_model(str(FIXTURE), "cpu", precision, "torch")
        out["openvino", precision] = load_image_model(str(FIXTURE), "cpu", precision, "openvino", ov_cache)
    return out


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _features(loaded, rgb) -> list[torch.Tensor]:
    return ImagePredictor(loaded)._encode(rgb).features


def _min_mask_iou(reference, other) -> list[float]:
    ref, pred = ImagePredictor(reference), ImagePredictor(other)
    ious = []
    for seed in range(4):
        scene, prompts = scene_prompts(seed)
        for p in prompts:
            a = ref.predict(f"s{seed}", scene.image, [p])[0].mask
            b = pred.predict(f"s{seed}", scene.image, [p])[0].mask
            assert 0 < a.sum() < a.size
            ious.append(float((a & b).sum() / (a | b).sum()))
    assert pred.encoder_calls == 4  # one encode per scene, by OpenVINO
    return ious


def test_the_loaded_model_says_it_runs_openvino_in_the_chosen_precision(models):
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        loaded = models["openvino", precision]
        assert loaded.encoder_runtime == "openvino" and loaded.ov_encoder.precision == hint
        assert loaded.precision == f"encoder OpenVINO {hint}, decoder fp32 (cpu)"
        assert loaded.ov_encoder.threads == torch.get_num_threads()
    assert models["torch", "fp32"].encoder_runtime == "torch"


def test_f32_features_match_pytorch_fp32_at_every_level(models):
    """Measured on the trained fixture: rel-L2 ~1e-7 per level (bound 1e-3)."""
    for seed in range(2):
        rgb = make_scene(seed).image
        ref, got = _features(models["torch", "fp32"], rgb), _features(models["openvino", "fp32"], rgb)
        assert [f.shape for f in got] == [f.shape for f in ref] and all(f.dtype == torch.float32 for f in got)
        errors = [_rel_l2(g, r) for g, r in zip(got, ref, strict=True)]
        assert max(errors) < 1e-3, errors


def test_the_openvino_encoder_takes_the_pytorch_encoders_place_and_its_weights_go(models):
    """transformers' own code calls it as it called the PyTorch encoder: the same outputs (FPN
    levels within f32 rounding, position encodings exactly), for a batch of one or two, and the
    model no longer holds the PyTorch encoder's weights."""
    torch_model, ov_model = models["torch", "fp32"].model, models["openvino", "fp32"].model
    assert isinstance(ov_model.vision_encoder, ove.OpenVINOVisionEncoder)
    assert not list(ov_model.vision_encoder.parameters())
    params = [sum(p.numel() for p in m.parameters()) for m in (torch_model, ov_model)]
    encoder_params = sum(p.numel() for p in torch_model.vision_encoder.parameters())
    assert params[1] == params[0] - encoder_params and encoder_params > params[1]
    pixels = torch.cat([preprocess(make_scene(s).image, 128, torch.device("cpu")) for s in range(2)])
    with torch.inference_mode():
        for batch in (pixels[:1], pixels):
            ref = torch_model.vision_encoder(batch, return_dict=True)
            got = ov_model.vision_encoder(batch, return_dict=True)
            for a, b in zip(got.fpn_hidden_states, ref.fpn_hidden_states, strict=True):
                assert a.shape == b.shape and _rel_l2(a, b) < 1e-3
            for a, b in zip(got.fpn_position_encoding, ref.fpn_position_encoding, strict=True):
                torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bf16_features_stay_within_the_bf16_bounds_of_pytorch(models):
    """PyTorch's bf16 autocast differs from fp32 by 0.5-1.6 % rel-L2 per level on the real-size
    model (SAM2.md); OpenVINO bf16 is held to 2 %, and to no more than twice PyTorch bf16's own
    error on the same image."""
    rgb = make_scene(1).image
    ref = _features(models["torch", "fp32"], rgb)
    ov_bf16 = [_rel_l2(g, r) for g, r in zip(_features(models["openvino", "bf16"], rgb), ref, strict=True)]
    pt_bf16 = [_rel_l2(g, r) for g, r in zip(_features(models["torch", "bf16"], rgb), ref, strict=True)]
    assert max(ov_bf16) < 2e-2, (ov_bf16, pt_bf16)
    assert all(o <= 2 * max(p, 1e-3) for o, p in zip(ov_bf16, pt_bf16, strict=True)), (ov_bf16, pt_bf16)
    assert min(ov_bf16) > 0  # it did compute in bf16: not bitwise fp32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_clicks_and_boxes_give_pytorchs_masks(models, precision):
    ious = _min_mask_iou(models["torch", "fp32"], models["openvino", precision])
    assert len(ious) >= 8 and min(ious) >= 0.98, ious


def test_concurrent_calls_each_use_their_own_infer_request(models):
    encoder = models["openvino", "fp32"].ov_encoder
    pixels = [preprocess(make_scene(s).image, 128, torch.device("cpu")) for s in range(2)]
    alone = [encoder.infer(p) for p in pixels]
    made = encoder.requests_made
    encoder.infer(pixels[0])
    assert encoder.requests_made == made  # one at a time: an idle request is reused
    results = {}

    def run(i):
        for _ in range(3):
            results.setdefault(i, []).append(encoder.infer(pixels[i % 2]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i, outs in results.items():
        for out in outs:
            for a, b in zip(out, alone[i % 2], strict=True):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert made <= encoder.requests_made <= made + 4  # pooled: never more than calls at once


# --- the cache -----------------------------------------------------------------------------------


def _entry(cache, precision):
    entries = [p for p in cache.iterdir() if p.is_dir() and p.name.endswith(f"-{precision}-128px")]
    assert len(entries) == 1, entries
    return entries[0]


def test_a_second_load_reads_the_cache_and_converts_nothing(models, ov_cache, caplog):
    before = ove.conversions
    with caplog.at_level(logging.INFO, logger="label_studio_sam2.engine.openvino_encoder"):
        again = load_image_model(str(FIXTURE), "cpu", "fp32", "openvino", ov_cache)
    assert ove.conversions == before and again.encoder_runtime == "openvino"
    assert "loaded from the cache" in caplog.text and "converting" not in caplog.text
    rgb = make_scene(2).image
    for a, b in zip(_features(again, rgb), _features(models["openvino", "fp32"], rgb), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the key names the model, OpenVINO's version, the stored weights' precision and the input size
    import openvino

    name = _entry(ov_cache, "f32").name
    assert name.startswith("sam2-shapes-") and f"-ov{openvino.__version__.split('-')[0]}-f32-128px" in name


def test_one_conversion_serves_both_precisions(models, ov_cache):
    """The module's fixture loaded f32 and bf16 from one empty cache: one entry (weights in f32),
    compiled once per precision."""
    entries = [p for p in ov_cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 1, entries
    bf16, f32 = models["openvino", "bf16"].ov_encoder, models["openvino", "fp32"].ov_encoder
    assert bf16.cache_entry == f32.cache_entry == entries[0] and bf16.precision != f32.precision


def _damage(entry, how):
    weights = entry / "encoder.bin"
    if how == "flipped bytes":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(
            b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64]
        )
        weights.write_bytes(bytes(data))  # same size, other values
    elif how == "no manifest":  # a conversion cut before its manifest (as by a kill)
        (entry / "manifest.json").unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])


def test_a_corrupt_or_partial_entry_is_detected_and_rebuilt(models, ov_cache, tmp_path, caplog):
    cache = tmp_path / "cache"
    good = _entry(ov_cache, "f32")
    assert ove._valid(good)
    for how in ("no manifest", "truncated", "flipped bytes"):  # the last is rebuilt below
        entry = cache / good.name
        shutil.rmtree(entry, ignore_errors=True)
        shutil.copytree(good, entry)
        _damage(entry, how)
        assert not ove._valid(entry), how
    before = ove.conversions
    with caplog.at_level(logging.INFO):
        rebuilt = load_image_model(str(FIXTURE), "cpu", "fp32", "openvino", cache)
    assert ove.conversions == before + 1 and "incomplete or corrupt: rebuilt" in caplog.text
    assert ove._valid(entry) and not [p for p in cache.iterdir() if p.name.startswith(".") and p.is_dir()]
    rgb = make_scene(0).image
    errors = [
        _rel_l2(a, b)
        for a, b in zip(_features(rebuilt, rgb), _features(models["torch", "fp32"], rgb), strict=True)
    ]
    assert max(errors) < 1e-3, errors


def test_loads_at_once_convert_once(models, tmp_path):
    """Four loaders (threads: each holds its own open lock file, so they exclude each other
    exactly as processes do) on an empty cache: one conversion, all compiled from it."""
    encoder = models["torch", "fp32"].model.vision_encoder
    before = ove.conversions
    barrier = threading.Barrier(4)
    loaded, errors = [], []

    def load():
        barrier.wait()
        try:
            loaded.append(ove.load_openvino_encoder(encoder, "m", 128, "f32", 1, tmp_path))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(loaded) == 4 and ove.conversions == before + 1
    assert len({e.cache_entry for e in loaded}) == 1


# --- falling back, choosing -----------------------------------------------------------------------


def test_a_failed_conversion_warns_once_and_pytorch_embeds(models, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("Cannot convert aten::something")

    monkeypatch.setattr(ove, "_convert", broken)
    with caplog.at_level(logging.WARNING):
        loaded = load_image_model(str(FIXTURE), "cpu", "fp32", "openvino", tmp_path)
    warnings = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "ENCODER_RUNTIME" in r.getMessage()
    ]
    assert len(warnings) == 1 and "PyTorch runs it" in warnings[0].getMessage()
    assert "Cannot convert" in warnings[0].getMessage()
    assert loaded.encoder_runtime == "torch" and loaded.precision == "fp32"
    assert not any(tmp_path.glob("*/manifest.json"))  # nothing half-made left as an entry
    # a click still gets its mask, PyTorch's
    scene, prompts = scene_prompts(0)
    got = ImagePredictor(loaded).predict("s", scene.image, prompts[:1])[0].mask
    want = ImagePredictor(models["torch", "fp32"]).predict("s", scene.image, prompts[:1])[0].mask
    assert got.any() and (got == want).all()


def test_a_missing_package_falls_back_to_pytorch(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with caplog.at_level(logging.WARNING):
        forced = load_image_model(str(FIXTURE), "cpu", "fp32", "openvino", tmp_path)
    assert forced.encoder_runtime == "torch" and "import of openvino halted" in caplog.text
    caplog.clear()
    auto = load_image_model(str(FIXTURE), "cpu", "fp32", "auto", tmp_path)
    assert auto.encoder_runtime == "torch" and "ENCODER_RUNTIME" not in caplog.text  # auto: no warning


def test_auto_picks_openvino_on_a_cpu_where_it_imports_and_torch_elsewhere(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ove.pick_runtime(cpu, "auto") == "openvino"
    assert ove.pick_runtime(cpu, "AUTO") == "openvino"
    assert ove.pick_runtime(cpu, "torch") == "torch"
    assert ove.pick_runtime(gpu, "auto") == "torch" and ove.pick_runtime(gpu, "openvino") == "torch"
    monkeypatch.setenv("ENCODER_RUNTIME", "auto")
    assert ove.pick_runtime(cpu) == "torch"  # the engine reads no environment: Settings passes it
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert ove.pick_runtime(cpu, "auto") == "torch"
    with pytest.raises(ValueError, match="ENCODER_RUNTIME='onnx'"):
        ove.pick_runtime(cpu, "onnx")


def test_auto_loads_the_openvino_encoder(models, ov_cache):
    loaded = load_image_model(str(FIXTURE), "cpu", "bf16", "auto", ov_cache)  # from the cache
    assert loaded.encoder_runtime == "openvino" and loaded.ov_encoder.precision == "bf16"


def test_store_keys_keep_each_runtimes_embeddings_apart(models, tmp_path):
    mid = models["torch", "fp32"].model_id
    keys = {store_key(m, "img") for m in models.values()}
    assert keys == {f"{mid}:img", f"{mid}:bf16:img", f"{mid}:ov-f32:img", f"{mid}:ov-bf16:img"}
    rgb = make_scene(0).image
    ImagePredictor(models["torch", "fp32"], store=EmbeddingStore(tmp_path)).embedding("img", rgb)
    ov = ImagePredictor(models["openvino", "fp32"], store=EmbeddingStore(tmp_path))
    ov.embedding("img", rgb)
    assert ov.encoder_calls == 1  # PyTorch's entry does not stand in for OpenVINO's
    again = ImagePredictor(models["openvino", "fp32"], store=EmbeddingStore(tmp_path))
    again.embedding("img", rgb)
    assert again.encoder_calls == 0  # its own entry is found


def test_settings_choose_the_runtime_and_put_the_cache_beside_the_store(tmp_path, monkeypatch):
    from label_studio_sam2.service.settings import Settings, SettingsError, default_store_dir

    monkeypatch.delenv("ENCODER_RUNTIME")
    assert Settings.from_env().encoder_runtime == "auto"  # the default: OpenVINO on a CPU
    monkeypatch.setenv("ENCODER_RUNTIME", "OpenVINO")
    assert Settings.from_env().encoder_runtime == "openvino"
    monkeypatch.setenv("ENCODER_RUNTIME", "onnx")
    with pytest.raises(SettingsError, match="ENCODER_RUNTIME"):
        Settings.from_env()
    monkeypatch.setenv("ENCODER_RUNTIME", "torch")
    store = tmp_path / "models" / "embeddings"
    assert Settings.from_env(store_dir=str(store)).encoder_cache_dir == str(tmp_path / "models" / "openvino")
    monkeypatch.setenv("EMBEDDING_STORE_DIR", "off")
    off = Settings.from_env()
    assert off.store_dir is None and off.encoder_cache_dir == str(
        __import__("pathlib").Path(default_store_dir()).parent / "openvino"
    )


def test_serve_takes_the_runtime_on_its_command_line():
    from label_studio_sam2.cli.main import build_parser

    assert build_parser().parse_args(["serve", "--encoder-runtime", "openvino"]).encoder_runtime == "openvino"
    assert build_parser().parse_args(["serve"]).encoder_runtime is None  # ENCODER_RUNTIME decides
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--encoder-runtime", "onnx"])


def test_the_server_loads_the_runtime_its_settings_name_from_the_cache_beside_its_store(
    models, ov_cache, tmp_path, caplog
):
    """ENCODER_RUNTIME -> Settings -> Runtime.load -> load_image_model, as CPU_PRECISION flows; the
    converted encoder is looked up in `openvino/` beside EMBEDDING_STORE_DIR (here prefilled: no
    conversion happens when it is found there)."""
    from label_studio_sam2.service.runtime import Runtime
    from label_studio_sam2.service.settings import Settings

    shutil.copytree(_entry(ov_cache, "f32"), tmp_path / "openvino" / _entry(ov_cache, "f32").name)
    settings = Settings.from_env(
        model=str(FIXTURE),
        device="cpu",
        cpu_precision="bf16",
        encoder_runtime="openvino",
        store_dir=str(tmp_path / "embeddings"),
    )
    before = ove.conversions
    runtime = Runtime(settings, load_in_background=False)
    with caplog.at_level(logging.INFO, logger="label_studio_sam2"):
        runtime.load()  # what the server's loader thread runs
    assert runtime.error is None and runtime.image_model.encoder_runtime == "openvino"
    assert runtime.image_model.ov_encoder.precision == "bf16" and ove.conversions == before
    assert runtime.image_model.ov_encoder.cache_entry.parent == tmp_path / "openvino"
    # the start-up log says what serves
    assert "image encoder runtime openvino: encoder OpenVINO bf16, decoder fp32 (cpu)" in caplog.text


@pytest.mark.parametrize("runtime", ["openvino", "torch"])
def test_health_says_which_runtime_and_precision_serve(models, runtime):
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.service.settings import Settings

    app = create_app(Settings.from_env(), loaded_model=models[runtime, "bf16"])
    health = app.test_client().get("/health").get_json()
    assert health["model_loaded"] is True and health["device"] == "cpu"
    assert health["encoder_runtime"] == runtime
    want = "encoder OpenVINO bf16" if runtime == "openvino" else "encoder bfloat16 autocast"
    assert health["precision"] == f"{want}, decoder fp32 (cpu)"


def test_warm_model_only_converts_ahead_so_the_server_starts_without_converting(tmp_path, capsys):
    """`label-studio-sam2 warm --model-only` (what a Docker volume is prepared with) converts the
    encoder into `openvino/` beside the store; the server then finds it there."""
    from label_studio_sam2.cli.main import main
    from label_studio_sam2.service.runtime import Runtime
    from label_studio_sam2.service.settings import Settings

    store = tmp_path / "models" / "embeddings"
    before = ove.conversions
    args = ["--model", str(FIXTURE), "--device", "cpu", "--encoder-runtime", "openvino"]
    main(["warm", "--model-only", "--store", str(store), *args])
    out = capsys.readouterr().out
    assert ove.conversions == before + 1
    assert "encoder runtime openvino: encoder OpenVINO f32, decoder fp32 (cpu)" in out
    assert f"converted encoder: {tmp_path / 'models' / 'openvino'}/sam2-shapes-" in out
    runtime = Runtime(
        Settings.from_env(model=str(FIXTURE), device="cpu", encoder_runtime="auto", store_dir=str(store)),
        load_in_background=False,
    )
    runtime.load()
    assert runtime.image_model.encoder_runtime == "openvino" and ove.conversions == before + 1
    with pytest.raises(SystemExit) as usage:  # one or the other
        main(["warm", "--store", str(store), *args])
    assert (
        usage.value.code == 2
        and "one of the arguments --project --model-only is required" in capsys.readouterr().err
    )


# --- video frames -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_video_frames_are_encoded_by_openvino_and_tracked_as_by_pytorch(models, precision, monkeypatch):
    """The video model shares the image model's encoder, OpenVINO's included: its frames are
    encoded there, stored under OpenVINO's precision tag, and tracked to PyTorch's boxes."""
    from devkit.videos import ClipFrames, crossing_clip
    from label_studio_sam2.engine.models import load_video_model
    from label_studio_sam2.engine.tracker import VideoTracker
    from label_studio_sam2.engine.tracks import ObjectPrompt
    from tests.test_video import box_iou

    image = models["openvino", precision]
    encoded = []
    infer = image.ov_encoder.infer
    monkeypatch.setattr(image.ov_encoder, "infer", lambda pixels: encoded.append(1) or infer(pixels))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_video.py tracks
    try:
        ov_video = load_video_model(str(FIXTURE), "cpu", share_with=image)
        assert ov_video.model.vision_encoder is image.ov_encoder and ov_video.encoder_runtime == "openvino"
        assert store_key(ov_video, "frame") == store_key(image, "frame")  # model:ov-f32:frame / ov-bf16
        clip = crossing_clip(0, num_frames=16)
        prompt = [ObjectPrompt(0, {4: clip.box(4)})]
        ov_track = (
            VideoTracker(ov_video)
            .track(ClipFrames(clip), prompt, max_frames_each_way=11, lost_after=5)
            .tracks[0]
        )
        torch_track = (
            VideoTracker(load_video_model(str(FIXTURE), "cpu"))
            .track(ClipFrames(clip), prompt, max_frames_each_way=11, lost_after=5)
            .tracks[0]
        )
    finally:
        torch.set_num_threads(threads)
    assert len(encoded) == 16  # every frame, by OpenVINO (PyTorch's tracker encoded its own)
    assert set(ov_track.boxes) == set(torch_track.boxes) == set(range(16))
    ious = [box_iou(ov_track.boxes[f], torch_track.boxes[f]) for f in range(16)]
    assert min(ious) >= 0.9, ious
