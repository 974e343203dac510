"""Streaming video tracker: SAM2 (`transformers` Sam2VideoModel) over frames read one at a time.

One `track()` call follows every object of a request in one inference session:

1. Prompts. Each prompted frame is decoded and run once; every object prompted there gets a
   conditioning output (box -> mask -> memory), as SAM2's `add_new_points_or_box` does. All
   prompts go in before tracking, so tracking between two prompts of an object remembers both.
2. Forward pass, frame by frame from the earliest prompted frame, up to `max_frames_each_way`
   past each object's last prompt; objects join at their first prompt.
3. Backward pass, from just before the latest first prompt down to `max_frames_each_way` before
   each object's first prompt (SAM2's reverse tracking: memories of the following frames).

What counts as the object on a frame: SAM2's mask can hold stray fragments away from the object
(seen on background texture and next to other objects), and the tight box around the whole mask
would swallow them. So only the mask's connected components that touch the object's part on the
previous frame of the pass (grown by a small margin) are the object; on a prompted frame, those
that touch the user's box. Memory is still encoded from SAM2's whole mask, as SAM2 does. A frame with no such component, or a presence
score <= 0, is a frame without the object. After such a gap the object counts as found again only
where it could plausibly come back (`_return_region`), and only while SAM2's own presence score
says the object is there (object_score_logits > 0 on every frame of the return):
- it left through the frame's edge (its last box touched an edge, and it was not moving away from
  it): only a component touching that edge, entering again across it;
- it vanished inside the frame (an occlusion): only a component near where it was last seen,
  within the motion it had: what its last box sweeps moving on at its velocity (over its last
  `VELOCITY_FRAMES` frames) for the frames elapsed, plus a margin of `RETURN_MARGIN` of its size.
That component must be of plausible size (within `SIZE_RATIO` of its recent areas, and at least
1 / `SIZE_RATIO`² of the largest) and persist for
`REAPPEAR_FRAMES` frames in a row, each touching the one before; those frames then start a new
visible span, so a stray sliver, or another object of its size elsewhere in the picture, never
makes a keyframe. SAM2's own state is untouched by this (its memory is encoded from its whole mask,
as SAM2 does): the rule decides only which frames are reported as the object's. An object absent
for `lost_after` consecutive frames is given up in that direction (instead of drifting onto the
background); it resumes at its next prompt, if any.

Bounded memory: frames come from a `FrameSource` one at a time (label_studio_sam2/engine/frames.py bounds the
decoder's share). The `transformers` session keeps every frame's outputs unless told otherwise;
here each step drops what SAM2's memory bank will not read again. Per object it keeps the
prompted frames' outputs, the mask memories of the last `num_maskmem - 1` tracked frames and the
object pointers of the last `max_object_pointers_in_encoder - 1` (6 and 15 for released models);
the preprocessed frame and the high-resolution masks go as soon as the step is done, and one
frame's image features stay cached. So the state is flat in video length
(`TrackProgress.state_bytes`).

Re-tracking without re-encoding: with an embedding store (label_studio_sam2/engine/store.py) and a video that says
what it is (`FrameSource.content_key`), each frame's image features, what the vision encoder
computes for it, go into the store, keyed by model, precision, video content and frame index.
A later track of the same video (after a labeler corrected a keyframe) takes them from there
and runs no encoder on frames seen before: one frame's features are read per step, so memory
stays flat. They are stored exactly, in the dtype the model computed them in (fp32 on CPU, the
autocast dtype on a GPU), so a re-track's tracks are those of a track without the store; about
17 MB a frame for a 1024 px model in fp32, within the store's size bound and LRU eviction. The
positional encodings beside them depend only on the feature sizes and are rebuilt, not stored.

The model is locked per frame, not per call: a long track leaves room for other requests'
clicks between its frames. Coordinates: continuous pixels (label_studio_sam2/engine/transforms.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from transformers import Sam2VideoInferenceSession

from label_studio_sam2.engine import hf_internals as hf
from label_studio_sam2.engine.frames import FrameSource, UnreadableVideo
from label_studio_sam2.engine.models import LoadedModel, store_key
from label_studio_sam2.engine.store import EmbeddingStore
from label_studio_sam2.engine.tracks import Box, ObjectPrompt, ObjectTrack, TrackProgress, TrackResult
from label_studio_sam2.engine.transforms import mask_box, preprocess, to_model_coords, upscale_logits

log = logging.getLogger(__name__)

__all__ = ["ObjectPrompt", "ObjectTrack", "TrackProgress", "TrackResult", "VideoTracker"]


class VideoTracker:
    """Tracks boxed objects through a video with a loaded `Sam2VideoModel`. Stateless between
    calls (each call has its own session), so one instance serves every request."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        store: EmbeddingStore | None = None,
        max_prompt_frames_attended: int = 8,
        prune_memory: bool = True,
    ):
        """`store`: keeps each frame's image features for the next track of the same video (a
        video without a `content_key` is tracked without it).
        `max_prompt_frames_attended`: how many of an object's prompted frames (the temporally
        closest) its memory attention reads on each frame; bounds the cost when a user has drawn
        many keyframes. With fewer prompts than this, tracking is exactly SAM2's.
        `prune_memory`: drop what the memory bank will not read again after each frame (False
        keeps every output, as the `transformers` session does by itself: tests compare the two)."""
        self.loaded = loaded
        self.store = store
        self.prune_memory = bool(prune_memory)
        config = loaded.model.config
        self.num_maskmem = int(config.num_maskmem)
        self.max_pointers = int(config.max_object_pointers_in_encoder)
        self.max_prompt_frames_attended = int(max_prompt_frames_attended)
        # What a frame cost in the last call: the next call's deadline check starts from it, so a
        # request with less time left than one frame does not start one.
        self.frame_cost_s = 0.0

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def track(
        self,
        frames: FrameSource,
        objects: list[ObjectPrompt],
        *,
        max_frames_each_way: int = 300,
        deadline: float | None = None,
        lost_after: int | None = 5,
        on_progress: Callable[[TrackProgress], None] | None = None,
    ) -> TrackResult:
        """Track `objects` through `frames`.

        Arguments:
            frames: the video (label_studio_sam2.engine.frames.VideoReader or any FrameSource).
            objects: one prompt per object (ids unique); frame indices are 0-based.
            max_frames_each_way: how far to follow each object past its last prompt and before
                its first one.
            deadline: a `time.monotonic()` value; the tracker stops before a frame it expects to
                finish after it and returns what it has, `partial=True`.
            lost_after: consecutive frames without the object before giving it up (None or 0:
                never).
            on_progress: called after every processed frame.
        Returns:
            TrackResult with one ObjectTrack per object.
        """
        ids = [o.obj_id for o in objects]
        if len(set(ids)) != len(ids):
            raise ValueError(f"object ids must be unique, got {ids}")
        for o in objects:
            bad = [f for f in o.boxes if not 0 <= f < frames.num_frames]
            if bad:
                raise ValueError(
                    f"object {o.obj_id}: prompt on frame {bad[0]}, the video has frames 0..{frames.num_frames - 1}"
                )
        run = _Run(self, frames, objects, max(0, int(max_frames_each_way)), deadline, lost_after, on_progress)
        return run.execute()


# --- one call's work -------------------------------------------------------------------------


REAPPEAR_FRAMES = 3  # frames in a row an object must be seen again after a gap to count as found
SIZE_RATIO = 4.0  # ... each time with an area within this factor of its recent areas (see _seen_again)
VELOCITY_FRAMES = 5  # the object's motion before a gap: its box centre's over its last frames seen
RETURN_MARGIN = 0.25  # after an occlusion: how far beyond its motion it may reappear (x its size)


@dataclass
class _Seen:
    mask: np.ndarray | None  # (H, W) bool, the model's whole mask; None: presence score <= 0 or empty
    score: float  # presence probability


@dataclass
class _Found:
    """The object's part of one frame's mask."""

    frame: int
    mask: np.ndarray  # (H, W) bool: the components that are the object
    box: Box
    confidence: float  # presence probability x the share of the mask that is the object


@dataclass(frozen=True)
class _Place:
    """Where the object was on one frame (what a return after a gap is judged against)."""

    frame: int
    box: Box
    area: int  # pixels of its part of the mask


@dataclass
class _ObjectPlan:
    """One object's frames, and where it stands in the current pass."""

    prompt: ObjectPrompt
    track: ObjectTrack
    prompt_frames: list[int]
    forward_end: int  # last frame the forward pass follows it to
    backward_end: int  # first frame the backward pass follows it to
    absent_run: int = 0  # frames since the object was last seen, in this pass
    paused_until: int | None = None  # lost: skip frames until this prompt frame
    done: bool = False  # nothing left in this pass
    prompt_masks: dict[int, np.ndarray] = field(default_factory=dict)  # the object on its prompted frames
    seen_last: _Found | None = None  # where it was last seen in this pass
    recent: list[_Place] = field(default_factory=list)  # its last places in this pass, latest last
    again: list[_Found] = field(default_factory=list)  # seen again after a gap, not yet sustained

    @property
    def first(self) -> int:
        return self.prompt_frames[0]

    @property
    def last(self) -> int:
        return self.prompt_frames[-1]

    def next_prompt_after(self, frame: int) -> int | None:
        return next((p for p in self.prompt_frames if p > frame), None)


@dataclass
class _Clock:
    deadline: float | None
    step_s: float = 0.0  # running estimate of one frame's cost
    stopped: bool = False

    def allows_another_step(self) -> bool:
        if self.deadline is None:
            return True
        if time.monotonic() + 1.2 * self.step_s > self.deadline:
            self.stopped = True
        return not self.stopped

    def past_deadline(self) -> bool:
        self.stopped = self.stopped or (self.deadline is not None and time.monotonic() >= self.deadline)
        return self.stopped

    @contextmanager
    def timing(self, since: float | None = None):
        t0 = time.monotonic() if since is None else since
        yield
        took = time.monotonic() - t0
        self.step_s = took if self.step_s == 0 else max(took, 0.7 * self.step_s + 0.3 * took)


@dataclass
class _Run:
    tracker: VideoTracker
    frames: FrameSource
    objects: list[ObjectPrompt]
    max_frames: int
    deadline: float | None
    lost_after: int | None
    on_progress: Callable[[TrackProgress], None] | None
    plans: list[_ObjectPlan] = field(default_factory=list)
    frames_done: int = 0
    frames_total: int = 0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        last = self.frames.num_frames - 1
        for o in self.objects:
            prompt_frames = sorted(o.boxes)
            fwd = min(last, prompt_frames[-1] + self.max_frames) if o.track_forward else prompt_frames[-1]
            bwd = max(0, prompt_frames[0] - self.max_frames) if o.track_backward else prompt_frames[0]
            track = ObjectTrack(o.obj_id)
            self.plans.append(_ObjectPlan(o, track, prompt_frames, fwd, bwd))
        self.clock = _Clock(self.deadline, step_s=self.tracker.frame_cost_s)
        prompted = {f for p in self.plans for f in p.prompt_frames}
        forward = {
            f for p in self.plans for f in range(p.first + 1, p.forward_end + 1) if f not in p.prompt.boxes
        }
        backward = {f for p in self.plans for f in range(p.backward_end, p.first)}
        self.frames_total = len(prompted) + len(forward) + len(backward)

    def execute(self) -> TrackResult:
        stored = None
        if self.tracker.store is not None:
            content_key = getattr(self.frames, "content_key", None)
            if content_key:
                stored = _StoredFrames(self.tracker.store, self.tracker.loaded, content_key)
        session = _Session(
            self.tracker, self.frames.height, self.frames.width, [o.obj_id for o in self.objects], stored
        )
        t0 = time.monotonic()
        try:
            self._prompts(session)
            if not self.clock.stopped:
                self._pass(session, reverse=False)
            session.forget_tracked()
            if not self.clock.stopped:
                self._pass(session, reverse=True)
        finally:
            session.close()
        tracks = {p.prompt.obj_id: p.track for p in self.plans}
        partial = self.clock.stopped
        found = sum(1 for t in tracks.values() if t.boxes)
        reused = (
            f" ({session.frames_from_store} with stored image features)" if session.frames_from_store else ""
        )
        message = (
            f"found {found} of {len(tracks)} object(s), running the model on {self.frames_done} frame(s)"
            f"{reused} in {time.monotonic() - t0:.1f} s"
        )
        notes = list(self.notes)
        if partial:
            notes.insert(
                0,
                f"partial: stopped before the deadline after {self.frames_done} of {self.frames_total} frames",
            )
        if self.frames_done:
            self.tracker.frame_cost_s = self.clock.step_s
        return TrackResult(
            tracks, self.frames_done, partial, "; ".join([message, *notes]), notes, session.frames_from_store
        )

    # --- the three phases ----------------------------------------------------------------------

    def _prompts(self, session: _Session) -> None:
        by_frame: dict[int, list[_ObjectPlan]] = {}
        for plan in self.plans:
            for f in plan.prompt_frames:
                by_frame.setdefault(f, []).append(plan)
        for f in sorted(by_frame):
            if not self.clock.allows_another_step():
                return
            with self.clock.timing():
                session.load(f, self.frames.frame(f))
                seen = session.prompt(f, {p.prompt.obj_id: p.prompt.boxes[f] for p in by_frame[f]})
            for plan in by_frame[f]:
                plan.track.mark(f)
                plan.track.scores[f] = seen[plan.prompt.obj_id].score
                found = _on_object(seen[plan.prompt.obj_id], f, _box_mask(plan.prompt.boxes[f], session.hw))
                if found is not None:
                    plan.prompt_masks[f] = found.mask
                    self._record(plan, found)
            self._progress(session, f)

    def _pass(self, session: _Session, reverse: bool) -> None:
        for plan in self.plans:
            plan.absent_run, plan.paused_until, plan.done = 0, None, False
            plan.again = []
            self._restart(plan, plan.first)
            if reverse and plan.backward_end >= plan.first:
                plan.done = True
        if reverse:
            spans = [(p.backward_end, p.first - 1) for p in self.plans if not p.done]
        else:
            spans = [(p.first, p.forward_end) for p in self.plans if p.forward_end > p.first]
        try:
            for indices in _segments(spans, reverse):  # frames no object needs are not decoded
                if not self._segment(session, indices, reverse):
                    return
        except UnreadableVideo as e:
            self.notes.append(f"{'backward' if reverse else 'forward'} pass ended early: {e}")
            log.warning("video became unreadable while tracking: %s", e)

    def _segment(self, session: _Session, indices: range, reverse: bool) -> bool:
        """Track through consecutive frames; False once nothing is left to do (or no time)."""
        frames = iter(self.frames.frames(indices))
        while True:
            fetched_at = time.monotonic()
            item = next(frames, None)
            if item is None:
                return True
            f, rgb = item
            tracked = [p for p in self.plans if self._due(p, f, reverse) and f not in p.prompt.boxes]
            if tracked:
                if not self.clock.allows_another_step():
                    return False
                with self.clock.timing(since=fetched_at):  # decoding counts: backward chunks cost
                    session.load(f, rgb)
                    seen = session.track(f, [p.prompt.obj_id for p in tracked], reverse)
                    if self.tracker.prune_memory:
                        session.prune(f, reverse)
                for plan in tracked:
                    plan.track.mark(f)
                    plan.track.scores[f] = seen[plan.prompt.obj_id].score  # until it is found there
                    self._follow(plan, f, seen[plan.prompt.obj_id], reverse)
                self._progress(session, f)
            elif self.clock.past_deadline():
                return False
            if all(p.done for p in self.plans):
                return False

    # --- bookkeeping ---------------------------------------------------------------------------

    def _due(self, plan: _ObjectPlan, f: int, reverse: bool) -> bool:
        """Whether the pass runs this object on frame f (a prompted frame counts: it resumes)."""
        if plan.done:
            return False
        if reverse:
            if f >= plan.first:
                return False
            if f < plan.backward_end:
                plan.done = True
                return False
            return True
        if f <= plan.first:
            return False
        if f > plan.forward_end:
            plan.done = True
            return False
        if plan.paused_until is not None:
            if f < plan.paused_until:
                return False
            plan.paused_until, plan.absent_run = None, 0
        if f in plan.prompt.boxes:  # the user's box: the object is there, whatever came before
            plan.absent_run, plan.again = 0, []
            self._restart(plan, f)
        return True

    @staticmethod
    def _prompted(plan: _ObjectPlan, f: int) -> _Found | None:
        mask, box = plan.prompt_masks.get(f), plan.track.boxes.get(f)
        if mask is None or box is None:
            return None
        return _Found(f, mask, box, plan.track.scores[f])

    def _restart(self, plan: _ObjectPlan, f: int) -> None:
        """On a prompted frame: the object is where the user's box says (its part of the mask
        there; the box itself when SAM2 found nothing in it)."""
        plan.seen_last = self._prompted(plan, f)
        if plan.seen_last is not None:
            plan.recent = [_place(plan.seen_last)]
        else:
            box = plan.prompt.boxes[f]
            plan.recent = [_Place(f, box, int(_box_mask(box, self.frames_hw).sum()))]

    @property
    def frames_hw(self) -> tuple[int, int]:
        return (self.frames.height, self.frames.width)

    @staticmethod
    def _record(plan: _ObjectPlan, found: _Found) -> None:
        plan.track.boxes[found.frame] = found.box
        plan.track.scores[found.frame] = found.confidence

    def _follow(self, plan: _ObjectPlan, f: int, seen: _Seen, reverse: bool) -> None:
        """Take the object's part of the frame's mask, or count the frame as one without it; give
        the object up after `lost_after` frames in a row without it."""
        if plan.absent_run == 0 and plan.seen_last is not None:  # followed without a gap
            found = _on_object(seen, f, plan.seen_last.mask)
            if found is not None:
                plan.seen_last = found
                plan.recent = [*plan.recent[-VELOCITY_FRAMES:], _place(found)]
                self._record(plan, found)
                return
        else:  # after a gap: only a sustained return, where it could come back, counts
            found = self._seen_again(plan, f, seen)
            plan.again = [*plan.again, found] if found is not None else []
            if len(plan.again) >= REAPPEAR_FRAMES:
                for again in plan.again:
                    self._record(plan, again)
                plan.recent = [*plan.recent, *map(_place, plan.again)][-(VELOCITY_FRAMES + 1) :]
                plan.seen_last, plan.again, plan.absent_run = found, [], 0
                return
        plan.absent_run += 1
        if plan.again or not self.lost_after or plan.absent_run < self.lost_after:
            return
        first_absent = f + (plan.absent_run - 1) * (1 if reverse else -1)
        if reverse:
            plan.track.lost_backward_at = first_absent
            plan.done = True
            return
        resume = plan.next_prompt_after(f)
        if resume is None:
            plan.track.lost_forward_at = first_absent
            plan.done = True
        else:
            plan.paused_until = resume

    def _seen_again(self, plan: _ObjectPlan, f: int, seen: _Seen) -> _Found | None:
        """The object on frame f after a gap: the part touching this return's previous frame, or,
        to begin one, the mask's largest component where the object could come back
        (`_return_region`); None unless SAM2 says it is present (no mask otherwise) and its size
        is plausible."""
        if plan.again:
            found = _on_object(seen, f, plan.again[-1].mask)
        else:
            found = _largest_within(seen, f, _return_region(plan.recent, f, self.frames_hw))
        if found is None:
            return None
        areas = [p.area for p in plan.recent]  # its size as it went (shrinking, if it left)
        least = max(min(areas) / SIZE_RATIO, max(areas) / SIZE_RATIO**2)  # not a sliver of it
        return found if least <= int(found.mask.sum()) <= SIZE_RATIO * max(areas) else None

    def _progress(self, session: _Session, f: int) -> None:
        self.frames_done += 1
        if self.on_progress is not None:
            self.on_progress(TrackProgress(self.frames_done, self.frames_total, f, session.state_bytes()))


# --- the transformers session, and what it keeps ----------------------------------------------


class _Session:
    """A `Sam2VideoInferenceSession` fed one frame at a time, pruned to what memory reads.

    It drives the model's per-object steps itself (the public `forward` runs every object of the
    session on every frame, and fails for objects whose first prompt is still ahead).
    """

    def __init__(
        self,
        tracker: VideoTracker,
        height: int,
        width: int,
        obj_ids: list[int],
        stored: _StoredFrames | None = None,
    ):
        self.tracker = tracker
        self.stored = stored
        self.frames_from_store = 0
        self._reused: int | None = None  # the frame whose features came from the store
        self._positions: list[torch.Tensor] | None = None
        self.loaded = tracker.loaded
        self.model = tracker.loaded.model
        self.device = tracker.loaded.device
        self.hw = (height, width)
        self.inner = Sam2VideoInferenceSession(
            video_height=height,
            video_width=width,
            inference_device=self.device,
            inference_state_device=self.device,
            video_storage_device=self.device,
            dtype=torch.float32,
        )
        self.idx = {obj_id: self.inner.obj_id_to_idx(obj_id) for obj_id in obj_ids}

    def load(self, frame: int, rgb: np.ndarray) -> None:
        if rgb.shape[:2] != self.hw:
            raise ValueError(
                f"frame {frame} is {rgb.shape[1]}x{rgb.shape[0]}, the video {self.hw[1]}x{self.hw[0]}"
            )
        if self.stored is not None:
            features = self.stored.get(frame)  # disk read outside the model lock
            if features is not None:
                hf.put_frame_features(
                    self.inner, frame, features, self._position_encodings(features[-1].dtype)
                )
                self._reused = frame
                self.frames_from_store += 1
                return
        self._reused = None
        pixels = preprocess(rgb, self.loaded.image_size, self.device)
        self.inner.add_new_frame(pixels, frame)

    def _keep_features(self, frame: int) -> None:
        """After a step on a frame the encoder ran on: its features go into the store."""
        if self.stored is not None and self._reused != frame:
            features = hf.frame_features(self.inner, frame)
            if features is not None:
                self.stored.put(frame, features)

    def _position_encodings(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The same for every frame: built once per session, on its first stored frame, under the
        autocast the encoder runs in (on a GPU some of their ops autocast to fp32)."""
        if self._positions is None or self._positions[-1].dtype != dtype:
            with torch.inference_mode(), self.loaded.autocast_context():
                self._positions = hf.position_encodings(self.model, self.device, dtype)
        return self._positions

    def prompt(self, frame: int, boxes: dict[int, Box]) -> dict[int, _Seen]:
        """Conditioning outputs for the objects boxed on this frame (no memory: SAM2's rule for a
        frame that gets a prompt before it was tracked)."""
        outs = {}
        with self._model_step():
            for obj_id, box in boxes.items():
                corners = to_model_coords(
                    np.asarray(box, dtype=np.float64).reshape(2, 2), self.hw, self.loaded.image_size
                )
                box_points = torch.as_tensor(corners, device=self.device)
                outs[obj_id] = hf.frame_step(self.model, self.inner, frame, self.idx[obj_id], box_points)
            seen = self._finish(frame, outs, conditioning=True)
        self._keep_features(frame)  # outside the model lock: other requests' clicks go first
        return seen

    def track(self, frame: int, obj_ids: list[int], reverse: bool) -> dict[int, _Seen]:
        """One tracking step on a loaded frame for these objects (memory-conditioned)."""
        outs = {}
        with self._model_step():
            for obj_id in obj_ids:
                outs[obj_id] = hf.frame_step(self.model, self.inner, frame, self.idx[obj_id], reverse=reverse)
            seen = self._finish(frame, outs, conditioning=False)
        self._keep_features(frame)
        return seen

    def _finish(self, frame: int, outs: dict[int, dict], conditioning: bool) -> dict[int, _Seen]:
        """Store outputs, encode their memories (batched), drop what memory never reads, and
        return each object's mask at the video's size with its presence probability."""
        by_idx = {self.idx[obj_id]: out for obj_id, out in outs.items()}
        hf.encode_memories(self.model, self.inner, frame, by_idx, conditioning)
        key = "cond_frame_outputs" if conditioning else "non_cond_frame_outputs"
        for obj_idx in by_idx:
            stored = hf.outputs_of(self.inner)[obj_idx][key][frame]
            stored.pop("high_res_masks", None)
            stored.pop("pred_masks", None)
        hf.forget_frame(self.inner, frame)

        low_res = torch.cat(
            [out["pred_masks"].reshape(1, *out["pred_masks"].shape[-2:]) for out in outs.values()]
        )
        masks = (upscale_logits(low_res, self.hw) > 0).cpu().numpy()  # (N, H, W)
        scores = torch.cat([out["object_score_logits"].reshape(1) for out in outs.values()]).float()
        present = (scores > 0).tolist()
        probs = torch.sigmoid(scores).tolist()
        seen = {}
        for i, obj_id in enumerate(outs):
            mask = masks[i] if present[i] and masks[i].any() else None
            seen[obj_id] = _Seen(mask, float(probs[i]))
        return seen

    def prune(self, frame: int, reverse: bool) -> None:
        """Drop tracked-frame outputs the memory bank will not read after `frame`: the next frame
        reads mask memories from the `num_maskmem - 1` frames before it and object pointers from
        the `max_object_pointers - 1` frames before it (after it, when tracking backwards)."""
        step = -1 if reverse else 1
        keep_memory = self.tracker.num_maskmem - 1
        keep_pointer = self.tracker.max_pointers - 1
        for per_obj in hf.outputs_of(self.inner).values():
            tracked = per_obj["non_cond_frame_outputs"]
            for f in list(tracked):
                distance = (frame - f) * step  # frames behind the current one
                if distance >= keep_pointer or distance < 0:
                    del tracked[f]
                elif distance >= keep_memory:
                    tracked[f].pop("maskmem_features", None)
                    tracked[f].pop("maskmem_pos_enc", None)

    def forget_tracked(self) -> None:
        """Between passes: keep only the prompted frames' outputs."""
        for per_obj in hf.outputs_of(self.inner).values():
            per_obj["non_cond_frame_outputs"].clear()

    def state_bytes(self) -> int:
        """Bytes of tensors the session holds (outputs, frames, cached image features)."""
        return sum(_nbytes(x) for x in hf.held_tensors(self.inner))

    def close(self) -> None:
        hf.close(self.inner)

    @contextmanager
    def _model_step(self):
        """The model's lock for one frame, inference mode, autocast, and the cap on how many
        prompted frames memory attention reads."""
        with (
            self.loaded.lock,
            torch.inference_mode(),
            self.loaded.autocast_context(),
            hf.prompt_frames_attended(self.model, self.tracker.max_prompt_frames_attended),
        ):
            yield


class _StoredFrames:
    """One video's per-frame image features in the embedding store.

    Key (label_studio_sam2.engine.models.store_key, as images): model id, the precision they were computed in (a
    GPU's bf16 features never stand in for a CPU's fp32 ones), then this format, the video's
    content key and the frame index.
    """

    FORMAT = "video-features-v1"  # bump when what is stored, or how frames are preprocessed, changes

    def __init__(self, store: EmbeddingStore, loaded: LoadedModel, content_key: str):
        self.prefix = store_key(loaded, f"{self.FORMAT}:{content_key}:")
        self.store = store
        vision = loaded.model.config.vision_config
        self.tokens = [int(h) * int(w) for h, w in vision.backbone_feature_sizes]  # per level
        self.writable = True

    def get(self, frame: int) -> list[torch.Tensor] | None:
        """The frame's features ((HW, 1, C) per level, on CPU), or None (not stored, or not what
        this model computes)."""
        found = self.store.get_tensors(f"{self.prefix}{frame}")
        if found is None:
            return None
        features = found[0]
        if [f.shape[0] if f.dim() == 3 else -1 for f in features] != self.tokens:
            return None
        return features

    def put(self, frame: int, features: list[torch.Tensor]) -> None:
        if self.writable:  # after a refused write (a full disk), the rest of this track skips it
            self.writable = self.store.put_tensors(f"{self.prefix}{frame}", features, {"frame": frame})


def _segments(spans: list[tuple[int, int]], reverse: bool) -> list[range]:
    """Inclusive (lo, hi) frame spans -> merged ranges in processing order."""
    merged: list[list[int]] = []
    for lo, hi in sorted(s for s in spans if s[1] >= s[0]):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    if reverse:
        return [range(hi, lo - 1, -1) for lo, hi in reversed(merged)]
    return [range(lo, hi + 1) for lo, hi in merged]


def _on_object(seen: _Seen, frame: int, near: np.ndarray | None) -> _Found | None:
    """The object's part of a frame's mask: the mask's connected components (8-connected) that
    touch `near` grown by `_margin`, or its largest component when `near` is None. None: no such
    part, or no mask at all.

    Arguments:
        near: (H, W) bool, where the object was (its part on the previous frame, the user's box).
    """
    if seen.mask is None:
        return None
    labels, count = ndimage.label(seen.mask, structure=np.ones((3, 3), bool))
    if near is None:  # the largest
        keep = np.array([int(np.argmax(ndimage.sum_labels(seen.mask, labels, np.arange(1, count + 1)))) + 1])
    else:
        keep = np.unique(labels[_grown(near, _margin(near))])
        keep = keep[keep > 0]
        if keep.size == 0:
            return None
    if keep.size == count:  # the whole mask (the usual case)
        part, share = seen.mask, 1.0
    else:  # clear the other components, each within its own box
        part = seen.mask.copy()
        for k, where in enumerate(ndimage.find_objects(labels), start=1):
            if k not in keep:
                part[where] &= labels[where] != k
        share = float(np.count_nonzero(part)) / float(np.count_nonzero(seen.mask))
    box = tuple(float(v) for v in mask_box(part))
    return _Found(frame, part, box, seen.score * share)


def _place(found: _Found) -> _Place:
    return _Place(found.frame, found.box, int(np.count_nonzero(found.mask)))


def _return_region(recent: list[_Place], frame: int, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: where an object last seen at `recent[-1]` may be seen again on `frame`.

    Its motion: the velocity of its box centre over `recent` (its last frames seen, in the pass's
    order). If its last box touched edges of the frame (within a tenth of its size, at least 2 px)
    and it was moving out through them (or standing still), it left through those edges (the ones
    it was moving out through fastest, within half): it can only come back across them, so the
    region is a strip along them. Otherwise it vanished inside the frame (occluded): the region is
    what its last box sweeps moving on at that velocity for the frames elapsed (it may also have
    stopped), grown by `RETURN_MARGIN` of its size."""
    h, w = hw
    first, last = recent[0], recent[-1]
    size = float(np.sqrt(max(p.area for p in recent)))
    x1, y1, x2, y2 = last.box
    vx = vy = 0.0
    if last.frame != first.frame:
        (fx, fy), (lx, ly) = _centre(first.box), _centre(last.box)
        steps = abs(last.frame - first.frame)
        vx, vy = (lx - fx) / steps, (ly - fy) / steps  # pixels per frame, in the pass's order
    tol = max(2.0, 0.1 * size)
    strip = max(1, int(np.ceil(tol)))
    touched = {  # edge: (its pixels, the speed out through it)
        "left": (np.s_[:, :strip], -vx, x1 <= tol),
        "right": (np.s_[:, w - strip :], vx, x2 >= w - tol),
        "top": (np.s_[:strip, :], -vy, y1 <= tol),
        "bottom": (np.s_[h - strip :, :], vy, y2 >= h - tol),
    }
    touched = {name: (where, out) for name, (where, out, touching) in touched.items() if touching}
    region = np.zeros(hw, bool)
    if touched:
        fastest = max(out for _, out in touched.values())
        still = 0.02 * size  # px/frame: slower than this, the box only jitters
        if fastest >= -still:
            for where, out in touched.values():
                if fastest <= still or out >= 0.5 * fastest:
                    region[where] = True
            return region
    elapsed = abs(frame - last.frame)
    dx, dy, margin = vx * elapsed, vy * elapsed, RETURN_MARGIN * size
    c1, r1 = (
        max(0, int(np.floor(x1 + min(0.0, dx) - margin))),
        max(0, int(np.floor(y1 + min(0.0, dy) - margin))),
    )
    c2, r2 = (
        min(w, int(np.ceil(x2 + max(0.0, dx) + margin))),
        min(h, int(np.ceil(y2 + max(0.0, dy) + margin))),
    )
    region[r1:r2, c1:c2] = True
    return region


def _centre(box: Box) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _largest_within(seen: _Seen, frame: int, region: np.ndarray) -> _Found | None:
    """The largest connected component (8-connected) of the frame's mask that overlaps `region`,
    as the object's part; None: no mask, or none there."""
    if seen.mask is None:
        return None
    labels, count = ndimage.label(seen.mask, structure=np.ones((3, 3), bool))
    inside = np.unique(labels[region & seen.mask])
    inside = inside[inside > 0]
    if inside.size == 0:
        return None
    sizes = ndimage.sum_labels(seen.mask, labels, inside)
    part = labels == inside[int(np.argmax(sizes))]
    share = float(np.count_nonzero(part)) / float(np.count_nonzero(seen.mask))
    return _Found(frame, part, tuple(float(v) for v in mask_box(part)), seen.score * share)


def _margin(mask: np.ndarray) -> int:
    """How far (pixels) a component may lie from where the object was and still be the object: a
    tenth of the object's size, at least 2 px (motion between frames, soft edges)."""
    return max(2, int(round(0.1 * np.sqrt(mask.sum()))))


def _grown(mask: np.ndarray, margin: int) -> np.ndarray:
    """`mask` dilated by a (2 margin + 1) square, computed around its box only."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    out = np.zeros_like(mask)
    if rows.size:
        y1, y2 = max(0, rows[0] - margin), rows[-1] + margin + 1
        x1, x2 = max(0, cols[0] - margin), cols[-1] + margin + 1
        out[y1:y2, x1:x2] = ndimage.maximum_filter(mask[y1:y2, x1:x2], size=2 * margin + 1)
    return out


def _box_mask(box: Box, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels a box (continuous pixels) covers, at least one."""
    h, w = hw
    x1, y1, x2, y2 = box
    c1, r1 = min(w - 1, max(0, int(x1))), min(h - 1, max(0, int(y1)))
    mask = np.zeros(hw, bool)
    mask[r1 : max(r1 + 1, int(np.ceil(y2))), c1 : max(c1 + 1, int(np.ceil(x2)))] = True
    return mask


def _nbytes(obj: object) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0
