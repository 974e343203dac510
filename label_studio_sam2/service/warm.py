"""Pre-encoding: fill the embedding store so a labeler's first click on an image is instant.

The tool-neutral part: `encode_items` encodes the images at a list of (item id, URL) pairs into
the persistent store (EMBEDDING_STORE_DIR) with a progress bar; it is resumable (images already
stored are skipped, and an index of URL -> content key, `UrlIndex`, lets a second run skip even the
download). Which items a project has is the adapter's: `label-studio-sam2 warm --project ID`
(label_studio_sam2.labelstudio.warm) reads Label Studio's tasks. The server starts the same job
for the next few tasks after a labeler's click (label_studio_sam2.service.prefetch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from label_studio_sam2.engine.models import encoder_precision
from label_studio_sam2.service.errors import BackendError

log = logging.getLogger(__name__)

INDEX = "urls.jsonl"


class UrlIndex:
    """URL -> image content key, appended to a file in the store (lines are whole or ignored).

    The URLs are kept whole (two images may differ only in their query string), so a presigned
    URL's token is in the file: it is readable by this user only (0600, an older file made so)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / INDEX
        self.keys: dict[str, str] = {}
        if self.path.is_file():
            with contextlib.suppress(OSError):  # not ours to change: it stays as it was
                os.chmod(self.path, 0o600)
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    url, key = json.loads(line)
                except (ValueError, TypeError):
                    continue  # a line cut short by a crash
                self.keys[url] = key

    def add(self, url: str, key: str) -> None:
        if self.keys.get(url) == key:
            return
        self.keys[url] = key
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a") as f:  # one short append per line: atomic enough across processes
            f.write(json.dumps([url, key]) + "\n")


@dataclass
class WarmSummary:
    encoded: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    model: str = ""  # the model id and encoder precision the store's entries are keyed by
    precision: str = ""

    def line(self) -> str:
        return (
            f"encoded {self.encoded}, already stored {self.skipped}, failed {len(self.failed)} "
            f"in {self.seconds:.1f} s"
        )

    def keyed_by(self) -> str:
        """What the entries are stored under: a run in another precision (CPU_PRECISION, another
        CPU or a GPU) or of another model finds none of them and encodes again."""
        return (
            f"stored as model {self.model}, encoder precision {self.precision} "
            "(another model or precision, e.g. CPU_PRECISION, keeps entries of its own)"
        )


def encode_items(runtime, todo: list[tuple[int, str]], progress: bool = True) -> WarmSummary:
    """Encode the images at `todo`'s (item id, URL) pairs into the runtime's store, those stored
    already skipped (the URL index lets a second run skip even the download). Downloads overlap
    encoding; a failed download is reported by item id, and the rest go on."""
    segmenter = runtime.require(0)
    predictor, store = segmenter.predictor, runtime.store
    index = UrlIndex(store.dir)
    summary = WarmSummary(model=predictor.loaded.model_id, precision=encoder_precision(predictor.loaded))
    start = time.perf_counter()

    def stored(url: str) -> bool:
        key = index.keys.get(url)
        return key is not None and predictor.is_stored(key, store)

    def fetch(item):
        task_id, url = item
        if stored(url):
            return task_id, url, None
        try:
            return task_id, url, runtime.media.load_image(url, task_id)
        except BackendError as e:
            return task_id, url, e

    bar = _progress(len(todo), progress)
    with ThreadPoolExecutor(2) as pool:  # the next download runs while this image encodes
        for task_id, url, image in pool.map(fetch, todo):
            if image is None:
                summary.skipped += 1
            elif isinstance(image, BackendError):
                summary.failed[task_id] = image.message
            elif encode_into_store(predictor, store, index, url, image):
                summary.encoded += 1
            else:
                summary.skipped += 1
            bar.update(1)
    bar.close()
    summary.seconds = time.perf_counter() - start
    for task_id, reason in summary.failed.items():
        log.warning("task %s not encoded: %s", task_id, reason)
    return summary


def encode_into_store(predictor, store, index: UrlIndex, url: str, image) -> bool:
    """Encode a downloaded image into the store unless it is there already; True if encoded now.
    The index remembers its URL, so the next run skips even the download."""
    index.add(url, image.key)
    if predictor.is_stored(image.key, store):  # under this model's and precision's key
        return False
    predictor.embedding(image.key, image.load)
    predictor.cache.clear()  # the store holds it; don't grow this process
    return True


def _progress(total: int, enabled: bool):
    return tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, desc="pre-encoding")
