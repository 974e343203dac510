"""The image encoder on OpenVINO: a CPU runtime that runs SAM2's vision encoder 2x faster than eager
PyTorch on a quiet CPU and far faster when other work shares it (bench/encoder.py).

Only `model.vision_encoder` (Hiera + FPN neck) is converted. `OpenVINOVisionEncoder` then takes its
place in the model: transformers' own code (`Sam2Model.get_image_embeddings`, the video model's
`get_image_features`) calls it as it called the PyTorch encoder, so image clicks, video frames,
automatic masks and fine-tuning all run it, and the PyTorch encoder's weights are freed (held once,
by OpenVINO). What comes after the encoder (the decoder's conv_s0/conv_s1 projections, which a
fine-tune trains, and the no-memory embedding) stays in PyTorch, so fine-tuned decoders keep
working on the base's converted encoder.

The converted model is cached on disk, `<cache dir>/<key>/` (key: model id, a fingerprint of the
encoder's weights, the OpenVINO version, the stored weights' precision and the input size). The
weights are stored in f32 and the inference precision (f32 or bf16) is chosen when compiling, so
one conversion serves both. An entry is written to a temporary directory and renamed into place,
under a file lock (two processes never convert at once), with a manifest holding each file's
sha256: a partial or corrupt entry is detected and rebuilt. Anything going wrong here is the
caller's to catch: `use_encoder_runtime` falls back to PyTorch with one warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import gc
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENCODER_RUNTIMES = ("auto", "torch", "openvino")
MANIFEST = "manifest.json"
XML, BIN = "encoder.xml", "encoder.bin"
STORED_PRECISION = "f32"  # the converted weights; INFERENCE_PRECISION_HINT picks f32 or bf16 at compile
conversions = 0  # conversions this process made (tests count them)


def openvino_available() -> bool:
    """Does the `openvino` package import here?"""
    try:
        import openvino  # noqa: F401
    except Exception:  # ImportError, or a broken install's own errors
        return False
    return True


def pick_runtime(device: torch.device, runtime: str | None = "torch") -> str:
    """`ENCODER_RUNTIME` auto | torch | openvino -> the runtime that runs: `torch` or `openvino`.

    auto: OpenVINO on a CPU when the package imports, PyTorch otherwise. GPUs always PyTorch (a
    forced `openvino` on a GPU too: it names the CPU runtime).
    """
    runtime = (runtime or "torch").lower()
    if runtime not in ENCODER_RUNTIMES:
        raise ValueError(f"ENCODER_RUNTIME={runtime!r}: expected one of {', '.join(ENCODER_RUNTIMES)}")
    if device.type != "cpu" or runtime == "torch":
        return "torch"
    if runtime == "auto":
        return "openvino" if openvino_available() else "torch"
    return "openvino"


class _FPN(torch.nn.Module):
    """The vision encoder as a function of the pixels alone, returning its FPN levels as a tuple
    (what `Sam2Model.get_image_features` reads from it)."""

    def __init__(self, vision_encoder: torch.nn.Module):
        super().__init__()
        self.vision_encoder = vision_encoder

    def forward(self, pixel_values):
        return tuple(self.vision_encoder(pixel_values, return_dict=True).fpn_hidden_states)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap fingerprint of a module's weights (shapes and a sample of each tensor's values):
    two random or retrained models with one model id never share a converted encoder."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[flat.numel() // 2 : flat.numel() // 2 + 64], flat[-64:]])
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def cache_key(model_id: str, fingerprint: str, version: str, precision: str, image_size: int) -> str:
    """The cache entry's name. precision: the STORED weights' (`f32`; an int8 entry would differ),
    not the inference hint: f32 and bf16 compile from one entry."""
    version = version.split("-")[0]  # 2026.4.1-22982-e213a147257-releases/2026/4 -> 2026.4.1
    key = f"{model_id}-{fingerprint}-ov{version}-{precision}-{image_size}px"
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _valid(entry: Path) -> bool:
    """Is `entry` a complete conversion: a manifest whose checksums match its files?"""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        return set(files) == {XML, BIN} and all(_sha256(entry / n) == files[n] for n in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert(vision_encoder: torch.nn.Module, image_size: int, out: Path) -> None:
    """Convert the vision encoder into `out` (encoder.xml/.bin, weights kept in f32) + manifest."""
    global conversions
    import openvino as ov

    conversions += 1
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        # tracing notes about Python branches on shapes: the input size is fixed, they hold
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        ov_model = ov.convert_model(_FPN(vision_encoder).eval(), example_input=example)
    ov.save_model(ov_model, out / XML, compress_to_fp16=False)
    manifest = {
        "files": {n: _sha256(out / n) for n in (XML, BIN)},
        "openvino": ov.__version__,
        "image_size": image_size,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def release_freed_memory() -> None:
    """Hand memory the allocator keeps after a conversion back to the system (glibc's
    malloc_trim; elsewhere nothing). Tracing and converting hiera-tiny leave ~1.6 GB of freed
    heap in the process: measured RSS 2.41 GB after converting, 0.81 GB after this (random
    real-size hiera-tiny, 2-core EPYC); loading from the cache instead: 0.67 GB."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        pass


class _Ticker:
    """Logs "still <doing> (N s)" every `every_s` while the block runs: conversion has no progress
    of its own to report, and a silent minute at start-up reads as a hang."""

    def __init__(self, doing: str, start: float, every_s: float = 10.0):
        self.doing, self.start, self.every_s = doing, start, every_s
        self._done = threading.Event()

    def _tick(self) -> None:
        while not self._done.wait(self.every_s):
            log.info("still %s (%.0f s)", self.doing, time.perf_counter() - self.start)

    def __enter__(self):
        threading.Thread(target=self._tick, name="openvino-convert-ticker", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()


def converted_encoder(vision_encoder: torch.nn.Module, cache_dir: Path, key: str, image_size: int) -> Path:
    """The directory of `vision_encoder` converted to OpenVINO under `cache_dir/key`: from the
    cache when it holds a valid entry, else converted (once: a file lock across processes and
    threads) and stored atomically."""
    entry = cache_dir / key
    if _valid(entry):
        log.info("OpenVINO image encoder loaded from the cache %s", entry)
        return entry
    cache_dir.mkdir(parents=True, exist_ok=True)
    # flock: each open() is its own lock, so threads of one process exclude each other as
    # processes do; released when the file closes
    with open(cache_dir / f".{key}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if _valid(entry):  # another process or thread converted it while we waited
            log.info("OpenVINO image encoder loaded from the cache %s", entry)
            return entry
        log.info(
            "converting the image encoder to OpenVINO (once per model and OpenVINO version, cached "
            "in %s): this takes a while (hiera-tiny: 15-40 s on 2 cores, larger models longer)",
            entry,
        )
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
        try:
            with _Ticker("converting the image encoder to OpenVINO", start):
                _convert(vision_encoder, image_size, tmp)
            if entry.exists():  # a partial or corrupt entry: replaced
                log.warning("OpenVINO cache entry %s was incomplete or corrupt: rebuilt", entry)
                shutil.rmtree(entry)
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted the image encoder to OpenVINO in %.1f s", time.perf_counter() - start)
        release_freed_memory()
        return entry


class OpenVINOVisionEncoder(torch.nn.Module):
    """The compiled vision encoder, standing in for transformers' Sam2 vision encoder
    (`model.vision_encoder`): `forward(pixel_values)` returns its `fpn_hidden_states` (from
    OpenVINO) and `fpn_position_encoding` (from the PyTorch encoder's parameter-free sine
    encoding, kept as `neck.position_encoding`, where transformers' video code also reads it).

    Concurrent calls never share an infer request: each takes an idle one from a pool, or makes
    one when every request is busy, and puts it back when done. No parameters: the PyTorch
    encoder's weights are not kept."""

    def __init__(self, compiled, precision: str, threads: int, cache_entry: Path | None, position_encoding):
        super().__init__()
        self.compiled = compiled
        self.precision = precision  # f32 | bf16: the INFERENCE_PRECISION_HINT it was compiled with
        self.threads = threads
        self.cache_entry = cache_entry
        self.neck = torch.nn.Module()
        self.neck.position_encoding = position_encoding
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self.requests_made = 0  # infer requests created (tests: concurrency never shares one)

    @property
    def tag(self) -> str:
        """How store keys and logs name it: `ov-f32`, `ov-bf16`."""
        return f"ov-{self.precision}"

    def _request(self):
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            self.requests_made += 1
            return self.compiled.create_infer_request()

    def infer(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The FPN levels (high to low resolution) for a batch of 1 (the converted input shape)."""
        request = self._request()
        try:
            request.infer({0: pixel_values.detach().float().cpu().numpy()})
            return [
                torch.from_numpy(request.get_output_tensor(i).data.copy())
                for i in range(len(self.compiled.outputs))
            ]
        finally:
            self._idle.put(request)

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        from transformers.models.sam2.modeling_sam2 import Sam2VisionEncoderOutput

        per_image = [self.infer(pixel_values[i : i + 1]) for i in range(pixel_values.shape[0])]
        fpn = tuple(torch.cat(level).to(pixel_values.device) for level in zip(*per_image, strict=True))
        encode = self.neck.position_encoding
        positions = tuple(encode(f.shape, f.device, f.dtype).to(f.dtype) for f in fpn)
        return Sam2VisionEncoderOutput(fpn_hidden_states=fpn, fpn_position_encoding=positions)


def load_openvino_encoder(
    vision_encoder: torch.nn.Module,
    model_id: str,
    image_size: int,
    precision: str,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> OpenVINOVisionEncoder:
    """Convert (or load from the cache) and compile `vision_encoder` for the CPU.

    precision: `f32` or `bf16` (OpenVINO's INFERENCE_PRECISION_HINT; the caller maps CPU_PRECISION
    onto it). threads: INFERENCE_NUM_THREADS (default: torch's thread count). cache_dir: where
    converted encoders are kept (None: the user cache dir's label-studio-sam2/openvino).
    Raises whatever conversion or compilation raises.
    """
    import openvino as ov

    if precision not in ("f32", "bf16"):
        raise ValueError(f"OpenVINO precision {precision!r}: expected f32 or bf16")
    threads = int(threads or torch.get_num_threads())
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    # weights are stored in f32 whatever the inference precision: one entry serves f32 and bf16
    key = cache_key(
        model_id, weights_fingerprint(vision_encoder), ov.__version__, STORED_PRECISION, image_size
    )
    entry = converted_encoder(vision_encoder, root, key, image_size)
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(entry / XML),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    log.info("OpenVINO image encoder compiled: %s precision, %d threads", precision, threads)
    return OpenVINOVisionEncoder(compiled, precision, threads, entry, vision_encoder.neck.position_encoding)


def default_cache_dir() -> Path:
    """~/.cache/label-studio-sam2/openvino, when the caller names no directory (the engine reads no
    environment: the service passes the directory beside the configured store, XDG_CACHE_HOME
    included)."""
    return Path.home() / ".cache" / "label-studio-sam2" / "openvino"
