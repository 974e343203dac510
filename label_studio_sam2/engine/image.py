"""Interactive image segmentation: an embedding cache and a stateless predictor.

Unlike `SAM2ImagePredictor` (which keeps the current image's features on `self`, so a shared
instance mixes two users' images), `ImagePredictor.predict()` takes the image's key with every
call and looks its embedding up in an LRU cache bounded in bytes. The first prompt on an image
runs the encoder once; every further prompt on it runs only the prompt encoder and mask decoder.

Shapes and units: points and boxes are continuous original-image pixels (see transforms.py);
masks come back at the original size as (H, W) bool arrays.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from label_studio_sam2.engine.mask_decoder import DecoderContext, decode, threads_for, weights_version
from label_studio_sam2.engine.models import LoadedModel, store_key
from label_studio_sam2.engine.transforms import preprocess, to_model_coords, upscale_logits

log = logging.getLogger(__name__)

PAD_LABEL = -10  # transformers' "ignore this point" label, used to batch prompts of unequal length


class DeadlineExceeded(TimeoutError):
    """`ImagePredictor.predict` stopped between two decoder batches: its deadline had passed.
    `done` of `total` prompts were decoded (and are dropped: the caller answers or hands off the
    whole request item)."""

    def __init__(self, done: int, total: int):
        super().__init__(f"deadline passed after {done} of {total} prompts")
        self.done = done
        self.total = total


@dataclass(frozen=True)
class Prompt:
    """What the user asked for one object.

    points_xy: (N, 2) float, continuous pixels XY of the original image (N may be 0).
    point_labels: (N,) int, 1 = positive (foreground), 0 = negative (background).
    box_xyxy: (4,) float pixels x1, y1, x2, y2, or None.
    mask_logits: low-res logits of an earlier prediction of this object (`MaskPrediction.low_res_logits`,
        or the same values as a numpy array, e.g. read back from a shared store), fed back as a
        dense prompt to refine it, or None.
    """

    points_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box_xyxy: np.ndarray | None = None
    mask_logits: torch.Tensor | np.ndarray | None = None

    def __post_init__(self):
        if len(self.points_xy) != len(self.point_labels):
            raise ValueError("points_xy and point_labels differ in length")
        if len(self.points_xy) == 0 and self.box_xyxy is None:
            raise ValueError("a prompt needs at least one point or a box")

    @property
    def multimask(self) -> bool:
        """A single click is ambiguous (part, object, group): ask for 3 candidates and keep the
        best by predicted IoU. More points or a box say which one is meant."""
        return len(self.points_xy) == 1 and self.box_xyxy is None


@dataclass
class MaskPrediction:
    """One object's mask.

    mask: (H, W) bool at the original image size, upscaled from the low-res logits on each
        access: a batch of many objects on a large image never holds more than the mask in use
        (100 boxes on a 12 MP image would otherwise be 4.8 GB of upscaled float logits).
    score: the decoder's predicted IoU of the chosen mask, in [0, 1] (clipped).
    object_score: probability that the object is present (sigmoid of the object-score logit).
    low_res_logits: (1, h, w) logits for refinement (`Prompt.mask_logits`).
    original_hw: the image's (H, W).
    """

    score: float
    object_score: float
    low_res_logits: torch.Tensor
    original_hw: tuple[int, int]

    @property
    def mask(self) -> np.ndarray:
        with torch.inference_mode():
            return (upscale_logits(self.low_res_logits, self.original_hw) > 0)[0].cpu().numpy()


@dataclass
class ImageEmbedding:
    """The encoder's output for one image, enough to decode any prompt on it."""

    features: list[torch.Tensor]  # multiscale feature maps, each (1, C, h, w)
    original_hw: tuple[int, int]
    nbytes: int

    @classmethod
    def of(cls, features: list[torch.Tensor], original_hw: tuple[int, int]) -> ImageEmbedding:
        features = [f.detach() for f in features]
        return cls(features, tuple(original_hw), sum(f.numel() * f.element_size() for f in features))


class EmbeddingCache:
    """Thread-safe LRU of image embeddings, bounded by total bytes (not by count: a 1024 px
    hiera embedding is 16 MB in fp32 whatever the image size)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def peek(self, key: str) -> ImageEmbedding | None:
        """Like get() without touching the hit/miss counters."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: str, item: ImageEmbedding) -> None:
        if item.nbytes > self.max_bytes:
            return  # caching would evict everything and still not fit
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._items[key] = item
            self.bytes += item.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


ImageLoader = Callable[[], np.ndarray]


class ImagePredictor:
    """Stateless per call: every method takes the image key; embeddings live in the cache.

    `image_key` must identify the image's content (e.g. a hash of its bytes); the model id is
    added here, so two models never share entries.
    """

    # Decoder contexts (label_studio_sam2/engine/mask_decoder.py) kept for this many recently decoded images: ~14 MB each
    # at hiera's 64x64x256, so only the images labelers are clicking on now hold one.
    MAX_DECODER_CONTEXTS = 4

    def __init__(
        self,
        loaded: LoadedModel,
        cache: EmbeddingCache | None = None,
        store=None,
        fast_decoder: bool = True,
        decode_batch: int = 8,
    ):
        self.loaded = loaded
        self.cache = cache if cache is not None else EmbeddingCache()
        self.store = store  # optional persistent second level: .get(key) / .put(key, ImageEmbedding)
        # False: decode through transformers' Sam2Model.forward (the reference the fast path equals)
        self.fast_decoder = fast_decoder
        # prompts per decoder call: the decoder's activations (about 35 MB a prompt at 1024 px)
        # never grow with the prompt count, and the model lock is released between batches
        self.decode_batch = max(1, int(decode_batch))
        self.encoder_calls = 0
        self.decoder_calls = 0
        self.on_timing: Callable[[str, float], None] | None = None
        self._contexts: OrderedDict[int, tuple[weakref.ref, DecoderContext]] = OrderedDict()
        self._contexts_lock = threading.Lock()

    # --- embeddings -------------------------------------------------------------------------

    def _key(self, image_key: str) -> str:
        # model, precision and image (label_studio_sam2.engine.models.store_key): a bf16 encoder's embeddings differ
        # slightly from fp32 ones, so the two never stand in for each other
        return store_key(self.loaded, image_key)

    def is_cached(self, image_key: str) -> bool:
        return self._key(image_key) in self.cache

    def is_stored(self, image_key: str, store=None) -> bool:
        """Is the image's embedding, as this predictor computes it, in its cache or in `store`
        (default: its own)? `warm` and the queue's warm jobs skip such images."""
        key = self._key(image_key)
        store = self.store if store is None else store
        return key in self.cache or (store is not None and key in store)

    def embedding(self, image_key: str, image: np.ndarray | ImageLoader) -> ImageEmbedding:
        """The embedding of an image: from the cache, the store, or the encoder (in that order).

        `image` is the (H, W, 3) uint8 RGB array, or a function returning it (called only on a
        miss, so a cache hit skips decoding the image too).
        """
        key = self._key(image_key)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if self.store is not None:
            stored = self.store.get(key)  # disk read and checksum outside the model lock
            if stored is not None:
                stored = ImageEmbedding.of(
                    [f.to(self.loaded.device) for f in stored.features], stored.original_hw
                )
                self.cache.put(key, stored)
                return stored
        with self.loaded.lock:
            hit = self.cache.peek(key)  # another thread may have encoded it while we waited
            if hit is not None:
                return hit
            rgb = image() if callable(image) else image
            emb = self._encode(rgb)
            self.cache.put(key, emb)
        if self.store is not None:
            self.store.put(key, emb)  # never raises; a full disk only skips storing
        return emb

    @torch.inference_mode()
    def _encode(self, rgb: np.ndarray) -> ImageEmbedding:
        start = time.perf_counter()
        pixel_values = preprocess(rgb, self.loaded.image_size, self.loaded.device)
        with self.loaded.encoder_autocast_context():  # OpenVINO's encoder: no autocast
            features = self.loaded.model.get_image_embeddings(pixel_values)
        if self.loaded.cpu_encoder_autocast is not None:
            features = [f.float() for f in features]  # the decoder runs in fp32 on CPU
        self.encoder_calls += 1
        self._timed("encoder", start)
        return ImageEmbedding.of(list(features), rgb.shape[:2])

    def _timed(self, what: str, start: float) -> None:
        if self.on_timing is not None:
            self.on_timing(what, time.perf_counter() - start)

    # --- decoding ---------------------------------------------------------------------------

    def decoder_context(self, emb: ImageEmbedding) -> DecoderContext:
        """The image's prompt-independent decoder work, computed on its first decode (under the
        model lock) and kept for the few most recently decoded images."""
        model = self.loaded.model
        with self._contexts_lock:
            entry = self._contexts.get(id(emb))
            if entry is not None and entry[0]() is emb and entry[1].version == weights_version(model):
                self._contexts.move_to_end(id(emb))
                return entry[1]
        with self.loaded.autocast_context():
            ctx = DecoderContext.of(model, [f.to(self.loaded.device) for f in emb.features])
        with self._contexts_lock:
            self._contexts[id(emb)] = (weakref.ref(emb), ctx)
            while len(self._contexts) > self.MAX_DECODER_CONTEXTS:
                self._contexts.popitem(last=False)
        return ctx

    def predict(
        self,
        image_key: str,
        image: np.ndarray | ImageLoader,
        prompts: list[Prompt],
        *,
        deadline: float | None = None,
    ) -> list[MaskPrediction]:
        """One mask per prompt, in order. Prompts of the same shape are decoded together, in
        batches of at most `decode_batch` (the same masks as one call: each prompt's decoding is
        independent of the others in its batch). `deadline` (time.monotonic()): checked between
        batches (the first always runs: a started task decodes at least one batch); past it,
        DeadlineExceeded and no result."""
        if not prompts:
            return []
        emb = self.embedding(image_key, image)
        done = 0

        def check() -> None:
            if done and deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(done, len(prompts))

        out: list[MaskPrediction | None] = [None] * len(prompts)
        # Group prompts that can share a decoder call: same kind (box or not), same multimask,
        # mask input or not. Points of unequal count are padded with the ignore label.
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault((p.box_xyxy is not None, p.multimask, p.mask_logits is not None), []).append(i)
        for (_, _, with_mask), idx in groups.items():
            step = 1 if with_mask else self.decode_batch  # dense prompts differ per object: one at a time
            for at in range(0, len(idx), step):
                check()
                batch = idx[at : at + step]
                results = self._decode(emb, [prompts[i] for i in batch])
                for i, r in zip(batch, results, strict=True):
                    out[i] = r
                done += len(batch)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def decode_logits(
        self, emb: ImageEmbedding, prompts: list[Prompt], min_iou: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched decoder call for prompts that share kind (box or not), mask input and
        multimask setting; points of unequal count are padded with the ignore label.

        min_iou: for callers that drop every candidate predicting a lower IoU (automatic masks):
        the fast decoder then skips upscaling prompts with no candidate at or above it (their
        logits are `label_studio_sam2.engine.mask_decoder.DROPPED_LOGIT`). The transformers path computes all.

        Returns:
            logits: (n, k, h, w) float32 low-res mask logits (k = 3 candidates if multimask, else 1);
            iou: (n, k) predicted IoU; object_logits: (n,) object-presence logits.
        """
        lm = self.loaded
        dev = lm.device
        n = len(prompts)
        hw = emb.original_hw
        kwargs: dict = {}
        max_pts = max(len(p.points_xy) for p in prompts)
        if max_pts:
            pts = np.zeros((n, max_pts, 2), np.float32)
            labels = np.full((n, max_pts), PAD_LABEL, np.int64)
            for i, p in enumerate(prompts):
                k = len(p.points_xy)
                pts[i, :k] = to_model_coords(p.points_xy, hw, lm.image_size)
                labels[i, :k] = p.point_labels
            # (batch=1 image, n objects, points, 2)
            kwargs["input_points"] = torch.from_numpy(pts)[None].to(dev)
            kwargs["input_labels"] = torch.from_numpy(labels)[None].to(dev)
        if prompts[0].box_xyxy is not None:
            boxes = np.stack([np.asarray(p.box_xyxy, np.float64).reshape(2, 2) for p in prompts])
            boxes = to_model_coords(boxes, hw, lm.image_size).reshape(n, 4)
            kwargs["input_boxes"] = torch.from_numpy(boxes)[None].to(dev)
        if prompts[0].mask_logits is not None:
            logits = torch.as_tensor(prompts[0].mask_logits)
            kwargs["input_masks"] = logits.reshape(1, 1, *logits.shape[-2:]).to(dev)
        start = time.perf_counter()
        with lm.lock:
            if self.fast_decoder and hasattr(lm.model, "mask_decoder"):  # a SAM2 (not a stand-in)
                masks, iou, object_logits = self._decode_fast(emb, prompts[0].multimask, min_iou, **kwargs)
            else:
                with lm.autocast_context():
                    out = lm.model(
                        image_embeddings=[f.to(dev) for f in emb.features],
                        multimask_output=prompts[0].multimask,
                        **kwargs,
                    )
                masks, iou, object_logits = out.pred_masks, out.iou_scores, out.object_score_logits
        self.decoder_calls += 1
        self._timed("decoder", start)
        return masks[0].float(), iou[0].float(), object_logits[0].float().reshape(n)

    def _decode_fast(self, emb: ImageEmbedding, multimask: bool, min_iou=None, input_masks=None, **prompt):
        """Sam2Model.forward's prompt handling, then the decoder from the image's context."""
        model = self.loaded.model
        ctx = self.decoder_context(emb)
        objects = next(t.shape[1] for t in (*prompt.values(), input_masks) if t is not None)
        with self.loaded.autocast_context(), threads_for(objects):
            if input_masks is not None and input_masks.shape[-2:] != model.prompt_encoder.mask_input_size:
                input_masks = torch.nn.functional.interpolate(
                    input_masks.float(),
                    size=model.prompt_encoder.mask_input_size,
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                ).to(input_masks.dtype)
            sparse, dense = model.prompt_encoder(
                input_points=prompt.get("input_points"),
                input_labels=prompt.get("input_labels"),
                input_boxes=prompt.get("input_boxes"),
                input_masks=input_masks,
            )
            return decode(model, ctx, sparse, dense if input_masks is not None else None, multimask, min_iou)

    @torch.inference_mode()
    def _decode(self, emb: ImageEmbedding, prompts: list[Prompt]) -> list[MaskPrediction]:
        """Decode prompts of one kind in one call; keep each prompt's best candidate."""
        n = len(prompts)
        logits, iou, object_logits = self.decode_logits(emb, prompts)
        best = iou.argmax(dim=-1)  # (n,)
        rows = torch.arange(n, device=logits.device)
        chosen = logits[rows, best]  # (n, h, w); upscaled one at a time by MaskPrediction.mask
        presence = torch.sigmoid(object_logits)
        scores = iou[rows, best].clamp(0, 1)
        return [
            MaskPrediction(
                score=float(scores[i]),
                object_score=float(presence[i]),
                low_res_logits=chosen[i : i + 1].detach().cpu(),
                original_hw=tuple(emb.original_hw),
            )
            for i in range(n)
        ]
