"""Label configs and regions in the shapes Label Studio 1.23.2 sends and stores, for E2E tests."""

from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from devkit.sample_media import region_id

IMAGE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="object"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="object"/></RectangleLabels>
</View>"""

VIDEO_CONFIG = """<View>
  <Video name="video" value="$video" framerate="25"/>
  <VideoRectangle name="box" toName="video"/>
  <Labels name="videoLabels" toName="video"><Label value="car"/></Labels>
</View>"""


def brush_masks(
    result: list[dict], width: int, height: int, from_name: str = "tag", labels: tuple[str, ...] = ("object",)
) -> list[np.ndarray]:
    """Decode every brush region of a result with the SDK's reference decoder; check its size,
    its control (`from_name`: IMAGE_CONFIG's "tag" by default) and that its label is one of
    `labels`."""
    brushes = [r for r in result if r["type"] == "brushlabels"]
    assert brushes, f"no brushlabels region in {result}"
    masks = []
    for r in brushes:
        assert (r["original_width"], r["original_height"]) == (width, height)
        assert (r["from_name"], r["to_name"]) == (from_name, "image")
        assert r["value"]["format"] == "rle"
        assert len(r["value"]["brushlabels"]) == 1 and r["value"]["brushlabels"][0] in labels
        data = decode_rle(r["value"]["rle"])
        assert data.size == width * height * 4, "RLE must decode to the displayed image's RGBA size"
        masks.append(data.reshape(height, width, 4)[:, :, 3] > 0)
    return masks


def videorectangle(video, frame: int = 1) -> dict:
    """A user's box on one frame, as the video labeling UI keeps it."""
    return {
        "id": region_id(),
        "type": "videorectangle",
        "from_name": "box",
        "to_name": "video",
        "origin": "manual",
        "value": {
            "framesCount": len(video.boxes_px),
            "duration": len(video.boxes_px) / video.fps,
            "labels": ["car"],
            "sequence": [
                {"frame": frame, "enabled": True, "rotation": 0, "time": (frame - 1) / video.fps}
                | video.rect_pct(frame)
            ],
        },
    }


def check_track(track: dict, video, user_region: dict) -> list[int]:
    """Check a videorectangle result against the video and the user's region; return its frames.

    A tiny random model loses the object at once, so one keyframe (the user's) is a valid track.
    """
    assert track["type"] == "videorectangle"
    assert (track["from_name"], track["to_name"]) == ("box", "video")
    assert track["id"] == user_region["id"], "the track must keep the user's region id so LS merges it"
    sequence = track["value"]["sequence"]
    frames = [k["frame"] for k in sequence]
    assert frames == sorted(set(frames)) and frames[0] >= 1 and frames[-1] <= len(video.boxes_px)
    assert frames[0] == user_region["value"]["sequence"][0]["frame"]
    for k in sequence:
        assert all(-1e-6 <= k[key] <= 100 + 1e-6 for key in ("x", "y", "width", "height")), k
    return frames


def object_iou(mask: np.ndarray, scene) -> float:
    """IoU of a decoded mask with the scene's main object (the ellipse in its box)."""
    from PIL import Image, ImageDraw

    truth = Image.new("L", (scene.width, scene.height))
    ImageDraw.Draw(truth).ellipse(scene.object_box_px, fill=1)
    truth = np.asarray(truth) > 0
    return float((mask & truth).sum() / max(1, (mask | truth).sum()))
