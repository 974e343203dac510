"""What the video tracker takes and gives back: plain typed values, no torch.

Coordinates are continuous pixels of the upright video frame (see label_studio_sam2/engine/transforms.py);
frame indices are 0-based positions in presentation order (see label_studio_sam2/engine/frames.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Box = tuple[float, float, float, float]  # x1, y1, x2, y2, continuous pixels


@dataclass(frozen=True)
class ObjectPrompt:
    """One object to track, given as boxes on one or more frames.

    `track_forward` / `track_backward`: whether to follow the object past its last prompted frame
    and before its first one (a user who ended an object's lifespan does not want it extended).
    """

    obj_id: int
    boxes: dict[int, Box]  # frame index -> box drawn by the user on that frame
    track_forward: bool = True
    track_backward: bool = True

    def __post_init__(self):
        if not self.boxes:
            raise ValueError(f"object {self.obj_id} has no prompt box")
        for frame, (x1, y1, x2, y2) in self.boxes.items():
            if not (x2 > x1 and y2 > y1):
                raise ValueError(f"object {self.obj_id}: empty box {(x1, y1, x2, y2)} on frame {frame}")


@dataclass
class ObjectTrack:
    """Where one object was found.

    `boxes` holds every frame where SAM2 saw the object (the tight box of the object's part of its
    mask: the components that continue the track, without stray fragments elsewhere), prompted
    frames included; a frame inside `span` without a box is a frame where the object was absent.
    `scores` holds every frame examined: on a frame with a box, the tracking confidence (object
    presence probability x the share of the mask that is the object's part); on one without, the
    presence probability.
    `lost_forward_at` / `lost_backward_at`: the first frame of the run of absent frames that made
    the tracker give the object up in that direction (None: it was not lost).
    """

    obj_id: int
    boxes: dict[int, Box] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)  # frame -> confidence (see above)
    span: tuple[int, int] | None = None  # first and last frame examined (inclusive)
    lost_forward_at: int | None = None
    lost_backward_at: int | None = None

    def mark(self, frame: int) -> None:
        lo, hi = self.span if self.span is not None else (frame, frame)
        self.span = (min(lo, frame), max(hi, frame))


@dataclass
class TrackResult:
    tracks: dict[int, ObjectTrack]  # by obj_id
    frames_processed: int  # frames run through the model, prompted frames included
    partial: bool  # stopped early (deadline) before covering every requested frame
    message: str  # one line for logs and users
    notes: list[str] = field(default_factory=list)  # the message's warnings (partial, unreadable)
    frames_from_store: int = 0  # of frames_processed: image features from the store, no encoder


@dataclass(frozen=True)
class TrackProgress:
    """Reported after every processed frame."""

    frames_done: int
    frames_total: int  # an upper bound: lost objects end early
    frame: int  # the frame just processed
    state_bytes: int  # tensors held by the tracking session right now
