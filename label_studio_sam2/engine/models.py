"""Loading SAM2 models: by short name, from a local Hugging Face directory, or from the HF cache.

One loader serves the interactive path, the bulk path, the video tracker and the CLI. Models are
the `transformers` implementations (`Sam2Model` for images, `Sam2VideoModel` for video); both
load from the same checkpoint directory (official `facebook/sam2*-hiera-*` repositories hold a
`sam2_video` checkpoint, which `Sam2Model` reads the image part of).

Tests and benchmarks never download weights: `tiny_config()` builds a small model of the real
architecture that runs on CPU in milliseconds, `write_test_model()` saves one to a directory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from label_studio_sam2.engine import openvino_encoder as ove
from label_studio_sam2.engine.convert import convert_checkpoint
from label_studio_sam2.engine.releases import DEFAULT_MODEL, SIZES, ModelUnavailable, hub_id, released_config

log = logging.getLogger(__name__)

_SHORT = re.compile(
    r"^(?:facebook/)?(?P<rel>sam2(?:\.1)?)?[-_ ]?(?:hiera[-_])?(?P<size>tiny|small|base[-_]?plus|b\+|large)$"
)


def resolve(spec: str | os.PathLike | None, converted_dir: str | os.PathLike | None = None) -> str:
    """Turn what a user wrote into something `from_pretrained` understands.

    Accepted: an existing directory; a Meta `.pt` checkpoint (converted once into a directory next
    to it, or under `converted_dir` when its folder is read-only: default ~/.cache/label-studio-sam2,
    the service passes SAM2_CONVERTED_DIR); a hub id (`facebook/sam2.1-hiera-tiny`); a short name (`tiny`, `sam2.1-large`,
    `sam2-base-plus`, `sam2.1_hiera_small`). A bare size means SAM2.1.
    """
    spec = str(spec or DEFAULT_MODEL).strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if spec.endswith(".pt"):
        if not path.is_file():
            raise ModelUnavailable(f"checkpoint {spec} does not exist")
        out = path.parent / (path.stem + "-hf")
        if not (out / "config.json").is_file() and not os.access(path.parent, os.W_OK):
            # a read-only mount: convert into our cache instead of next to the checkpoint
            cache = Path(converted_dir or Path.home() / ".cache" / "label-studio-sam2")
            out = cache / (path.stem + "-hf")
        if not (out / "config.json").is_file():
            log.info("converting Meta checkpoint %s -> %s", path, out)
            convert_checkpoint(path, out)
        return str(out)
    m = _SHORT.match(spec.lower())
    if m:
        size = m.group("size").replace("_", "-")
        size = {"baseplus": "base-plus", "b+": "base-plus"}.get(size, size)
        return hub_id(m.group("rel") or "sam2.1", size)
    if "/" in spec and not path.exists():
        return spec  # another hub id (a fine-tuned model, say)
    raise ModelUnavailable(
        f"model {spec!r} is neither a directory, a .pt checkpoint, a hub id nor a short name "
        f"(sam2|sam2.1 and {'|'.join(SIZES)})"
    )


def pick_device(preference: str | None = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable("DEVICE=cuda but torch sees no CUDA GPU (is this the CPU wheel of torch?)")
    return torch.device(pref)


def set_cpu_threads(n: int) -> None:
    """torch's intra-op CPU threads for this process (0: leave torch's choice)."""
    if n > 0:
        torch.set_num_threads(n)


CPU_PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX-512 BF16 or AMX)? Without it, PyTorch emulates
    bf16 and autocast made the encoder 11x slower on an AVX2 machine."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it, fp16 on older GPUs, none (fp32) elsewhere (see cpu_encoder_dtype
    for the CPU's encoder)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_encoder_dtype(device: torch.device, precision: str | None = "fp32") -> torch.dtype | None:
    """The image encoder's autocast dtype on CPU: `CPU_PRECISION` auto | fp32 | bf16 (None: fp32;
    the engine reads no environment: the service passes the setting, whose default is auto).

    auto: bf16 where the CPU has native bf16 (measured: encoder 1.47x faster on an AVX-512 BF16
    EPYC, feature maps within 0.5-1.6 % relative L2, masks IoU >= 0.98 with fp32), fp32 elsewhere.
    bf16 forces it (on a CPU without native bf16 it is slow: for tests and measurements).
    The decoder stays fp32: it is small and where the masks' edges are decided.
    """
    precision = (precision or "fp32").lower()
    if precision not in CPU_PRECISIONS:
        raise ValueError(f"CPU_PRECISION={precision!r}: expected one of {', '.join(CPU_PRECISIONS)}")
    if device.type != "cpu" or precision == "fp32":
        return None
    if precision == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class HubAccess:
    """May the Hugging Face hub be contacted for weights missing locally, and where is it
    (HF_HUB_OFFLINE, HF_ENDPOINT: the service passes its settings; the default is the public hub)."""

    offline: bool = False
    endpoint: str = "https://huggingface.co"


@dataclass
class LoadedModel:
    """A model on its device, with what callers need to know about it."""

    model: torch.nn.Module
    source: str  # what it was loaded from (directory or hub id)
    model_id: str  # stable identifier: goes into cache keys and model_version
    device: torch.device
    image_size: int  # the square input side the encoder expects (1024 for released models)
    autocast: torch.dtype | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    cpu_encoder_autocast: torch.dtype | None = None  # CPU only: the image encoder's autocast dtype
    ov_encoder: Any = None  # CPU only: the vision encoder on OpenVINO (label_studio_sam2.engine.openvino_encoder), if it runs

    @property
    def encoder_runtime(self) -> str:
        """`openvino` or `torch`: what computes image features."""
        return "openvino" if self.ov_encoder is not None else "torch"

    def autocast_context(self):
        if self.autocast is None:
            return torch.autocast(device_type="cpu", enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def encoder_autocast_context(self):
        """The image encoder's precision: the model's autocast, or bf16 on a CPU chosen for it.
        None on OpenVINO, which computes in the precision it was compiled for (the PyTorch rest of
        `get_image_embeddings`, the decoder's projections, stays fp32)."""
        if self.ov_encoder is not None:
            return torch.autocast(device_type="cpu", enabled=False)
        if self.autocast is None and self.cpu_encoder_autocast is not None:
            return torch.autocast(device_type="cpu", dtype=self.cpu_encoder_autocast)
        return self.autocast_context()

    @property
    def precision(self) -> str:
        """What ran, in words (benchmarks and logs report it)."""
        if self.ov_encoder is not None:
            return f"encoder OpenVINO {self.ov_encoder.precision}, decoder fp32 (cpu)"
        if self.autocast is not None:
            return f"{str(self.autocast).removeprefix('torch.')} autocast ({self.device.type})"
        if self.cpu_encoder_autocast is not None:
            return f"encoder {str(self.cpu_encoder_autocast).removeprefix('torch.')} autocast, decoder fp32 (cpu)"
        return "fp32"


def encoder_precision(loaded: LoadedModel) -> str:
    """How `loaded` computes image features, as store keys and `warm` name it: `fp32` (a CPU
    without autocast), `bf16` (a CPU's bf16 encoder, CPU_PRECISION), `cuda-bf16` / `cuda-fp16`
    (a GPU's autocast; the device is named because a GPU's features differ from a CPU's), `ov-f32`
    / `ov-bf16` (the encoder on OpenVINO, ENCODER_RUNTIME: not bitwise PyTorch's features)."""
    if loaded.ov_encoder is not None:
        return loaded.ov_encoder.tag
    if loaded.autocast is not None:
        return f"{loaded.device.type}-{_short_dtype(loaded.autocast)}"
    if loaded.cpu_encoder_autocast is not None:
        return _short_dtype(loaded.cpu_encoder_autocast)
    return "fp32"


def _short_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def store_key(loaded: LoadedModel, name: str) -> str:
    """The embedding store's (and cache's) key for what `loaded` computes for `name`: an image's
    content key, or a video's frame (label_studio_sam2/engine/tracker.py). The one place such keys are made: the
    predictor, `warm`, the queue's warm jobs, video frame features and fine-tuned decoders (which
    share their base's encoder) all read and write through it.

    Model id, then the encoder's precision (`encoder_precision`), so features computed in one
    precision never stand in for another's: `model:name` for fp32 (the keys stores have always
    had), `model:bf16:name` for a CPU's bf16 encoder, `model:cuda-bf16:name` on a GPU,
    `model:ov-f32:name` / `model:ov-bf16:name` for the encoder on OpenVINO.
    """
    precision = encoder_precision(loaded)
    return f"{loaded.model_id}:{name}" if precision == "fp32" else f"{loaded.model_id}:{precision}:{name}"


def _model_id(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        # A directory's identity is its weights, not its path: hash the config and weight sizes
        # cheaply so two copies of one model share cache entries and a retrained one does not.
        import hashlib

        h = hashlib.sha256()
        for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix == ".json" or f.stat().st_size < 64 << 20:
                h.update(f.read_bytes())
        return f"{path.name}-{h.hexdigest()[:10]}"
    return source.split("/")[-1]


def _from_pretrained(cls, source: str, hub: HubAccess | None = None, **kwargs):
    """Load offline first (the HF cache or a directory); go to the hub only when allowed."""
    hub = hub or HubAccess()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the sam2_video -> sam2 type note is expected here
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as offline_error:
        if Path(source).is_dir() or hub.offline or not _hub_reachable(hub.endpoint):
            raise _unavailable(source, offline_error) from offline_error
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as online_error:  # network, auth, missing repo: all mean "provide weights"
        raise _unavailable(source, online_error) from online_error


def _hub_reachable(endpoint_url: str = "https://huggingface.co", timeout_s: float = 3.0) -> bool:
    """Can the hub be reached at all? Without this, an offline machine waits through the hub
    client's retries (~25 s) before the user learns that weights are missing."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(endpoint_url)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _unavailable(source: str, error: Exception) -> ModelUnavailable:
    return ModelUnavailable(
        f"cannot load SAM2 weights {source!r}: {type(error).__name__}: {str(error).splitlines()[0][:200]}. "
        "Provide them in one of these ways: (1) run once with network access so they land in the "
        "Hugging Face cache (HF_HOME), (2) SAM2_MODEL=/path/to/dir (or --model) pointing at a "
        "directory saved with save_pretrained, (3) SAM2_MODEL=/path/to/sam2.1_hiera_tiny.pt, a Meta "
        "checkpoint, converted on first use (or `label-studio-sam2 convert CKPT.pt DIR`). For a "
        "smoke test without weights: `label-studio-sam2 make-test-model DIR`."
    )


def load_image_model(
    spec: str | None = None,
    device: str | None = "auto",
    cpu_precision: str | None = "fp32",
    encoder_runtime: str | None = "torch",
    encoder_cache_dir: str | os.PathLike | None = None,
    converted_dir: str | os.PathLike | None = None,
    hub: HubAccess | None = None,
) -> LoadedModel:
    """Load a `Sam2Model` (image predictor) in eval mode on the chosen device.

    Every option is an argument (the engine reads no environment; the service's
    `load_configured_model` passes the settings). cpu_precision: auto | fp32 | bf16 for the encoder
    on CPU (default fp32; see `cpu_encoder_dtype`). encoder_runtime: auto | torch | openvino
    (default torch; see `use_encoder_runtime`), its converted encoder cached under
    encoder_cache_dir. converted_dir: see `resolve`; hub: may the hub be contacted, and where.
    Raises `ModelUnavailable` with instructions when the weights cannot be had.
    """
    from transformers import Sam2Model

    source = resolve(spec, converted_dir)
    dev = pick_device(device)
    model = _from_pretrained(Sam2Model, source, hub).eval().to(dev)
    image_size = int(model.config.prompt_encoder_config.image_size)
    loaded = LoadedModel(model, source, _model_id(source), dev, image_size, autocast_dtype(dev))
    loaded.cpu_encoder_autocast = cpu_encoder_dtype(dev, cpu_precision)
    use_encoder_runtime(loaded, encoder_runtime, encoder_cache_dir)
    log.info("image model precision: %s", loaded.precision)
    return loaded


def use_encoder_runtime(
    loaded: LoadedModel, runtime: str | None = "torch", cache_dir: str | os.PathLike | None = None
) -> LoadedModel:
    """Put `loaded`'s image encoder on the runtime `ENCODER_RUNTIME` picks (label_studio_sam2.engine.openvino_encoder:
    OpenVINO on a CPU where it is installed, for `auto`). OpenVINO computes in the precision
    CPU_PRECISION chose (fp32 -> f32, bf16 -> bf16) on torch's thread count, and its encoder
    replaces `loaded.model.vision_encoder` (the PyTorch encoder's weights are freed unless
    something else holds them). When the package is missing or conversion or compilation fails:
    one warning, and PyTorch serves. An encoder already on OpenVINO is kept."""
    chosen = ove.pick_runtime(loaded.device, runtime)
    current = loaded.model.vision_encoder
    if isinstance(current, ove.OpenVINOVisionEncoder):
        loaded.ov_encoder = current
        return loaded
    loaded.ov_encoder = None
    if chosen != "openvino":
        return loaded
    precision = "bf16" if loaded.cpu_encoder_autocast == torch.bfloat16 else "f32"
    try:
        encoder = ove.load_openvino_encoder(
            current, loaded.model_id, loaded.image_size, precision, cache_dir=cache_dir
        )
    except Exception as e:  # ImportError, a conversion or compile error: PyTorch serves instead
        log.warning(
            "ENCODER_RUNTIME: the OpenVINO image encoder is unavailable (%s: %s); PyTorch runs it",
            type(e).__name__,
            str(e).splitlines()[0][:300] if str(e) else "",
        )
        return loaded
    loaded.model.vision_encoder = encoder
    loaded.ov_encoder = encoder
    return loaded


def module_view(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `model` whose submodules, parameters and buffers are its own dicts: it
    shares every one of them until the caller puts another in its place (another encoder:
    `with_encoder_runtime`; another decoder: `finetune.with_decoder`), leaving `model` as it was."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._parameters = dict(model._parameters)
    view._buffers = dict(model._buffers)
    return view


def with_encoder_runtime(
    loaded: LoadedModel, runtime: str | None, cache_dir: str | os.PathLike | None = None
) -> LoadedModel:
    """`loaded` with its image encoder on `runtime`, leaving `loaded` as it was: a view of its
    model sharing every module but the encoder (benchmarks and tests compare runtimes on one
    set of weights)."""
    view = dataclasses.replace(
        loaded, model=module_view(loaded.model), lock=threading.RLock(), ov_encoder=None
    )
    return use_encoder_runtime(view, runtime, cache_dir)


def load_video_model(
    spec: str | None = None,
    device: str | None = "auto",
    share_with: LoadedModel | None = None,
    converted_dir: str | os.PathLike | None = None,
    hub: HubAccess | None = None,
) -> LoadedModel:
    """Load a `Sam2VideoModel` for tracking (converted_dir, hub: as `load_image_model`).

    `share_with`: an image model loaded from the same weights; its vision encoder is reused so
    the encoder's weights are held in memory once, and both share one lock (one model in use at a
    time per process).
    """
    from transformers import Sam2VideoModel

    source = resolve(spec, converted_dir)
    dev = pick_device(device)
    model = _from_pretrained(Sam2VideoModel, source, hub).eval().to(dev)
    loaded = LoadedModel(
        model, source, _model_id(source), dev, int(model.config.image_size), autocast_dtype(dev)
    )
    if share_with is not None and share_with.source == source:
        # its encoder on OpenVINO too, when the image model's is (ENCODER_RUNTIME): frames are
        # encoded as images are, and stored under the same precision tag
        model.vision_encoder = share_with.model.vision_encoder
        loaded.ov_encoder = share_with.ov_encoder
        loaded.lock = share_with.lock
    return loaded


# --- tiny models for tests, smoke runs and benchmarks ----------------------------------------


def tiny_config(image_size: int = 256, fpn_hidden: int = 128):
    """A small `Sam2VideoConfig` of the real architecture (~2.5 M parameters at 256 px).

    The same config serves `Sam2Model` (image) and `Sam2VideoModel`. Hidden sizes are multiples
    of 64 and > 64 as the attention kernels need; the input side is `image_size`, so
    preprocessing must read it from the config rather than assume 1024.
    """
    from transformers import Sam2VideoConfig

    s = image_size
    backbone = dict(
        model_type="sam2_hiera_det_model",
        hidden_size=32,
        num_attention_heads=1,
        image_size=[s, s],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[32, 64, 128, 256],
        num_attention_heads_per_stage=[1, 1, 2, 4],
        window_size_per_stage=[8, 4, 8, 4],
        global_attention_blocks=[3],  # never the first block of a stage (query pooling)
        window_positional_embedding_background_size=[4, 4],
    )
    vision = dict(
        model_type="sam2_vision_model",
        backbone_config=backbone,
        backbone_channel_list=[256, 128, 64, 32],
        backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
        fpn_hidden_size=fpn_hidden,
    )
    return Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=fpn_hidden, image_size=s, patch_size=16),
        mask_decoder_config=dict(
            hidden_size=fpn_hidden, mlp_dim=256, num_attention_heads=4, iou_head_hidden_dim=fpn_hidden
        ),
        image_size=s,
        memory_attention_hidden_size=fpn_hidden,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=256,
        memory_attention_rope_feat_sizes=[s // 16, s // 16],
        memory_encoder_hidden_size=fpn_hidden,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=fpn_hidden,
        memory_fuser_embed_dim=fpn_hidden,
        memory_fuser_intermediate_dim=256,
    )


def real_config(release: str = "sam2.1", size: str = "tiny"):
    """The config of a released model, without its weights (benchmarks: real latency, random
    masks). The per-size architecture table is in `label_studio_sam2.engine.releases`."""
    return released_config(size, release)


def write_test_model(directory: str | os.PathLike, seed: int = 0, image_size: int = 256) -> Path:
    """Save a tiny randomly initialised SAM2 (image + video parts) to `directory`."""
    from transformers import Sam2VideoModel

    torch.manual_seed(seed)
    model = Sam2VideoModel(tiny_config(image_size)).eval()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def random_model(config, kind: str = "image", cpu_precision: str | None = "fp32") -> LoadedModel:
    """A randomly initialised model from a config, on CPU (tests and benchmarks); its encoder's
    precision as `cpu_encoder_dtype` chooses (fp32 unless asked)."""
    from transformers import Sam2Config, Sam2Model, Sam2VideoModel

    if kind == "image":
        cfg = Sam2Config(
            vision_config=config.vision_config,
            prompt_encoder_config=config.prompt_encoder_config,
            mask_decoder_config=config.mask_decoder_config,
        )
        model = Sam2Model(cfg).eval()
        size = int(cfg.prompt_encoder_config.image_size)
    else:
        model = Sam2VideoModel(config).eval()
        size = int(config.image_size)
    loaded = LoadedModel(model, "random", f"random-{kind}-{size}", torch.device("cpu"), size)
    loaded.cpu_encoder_autocast = cpu_encoder_dtype(loaded.device, cpu_precision)
    return loaded
