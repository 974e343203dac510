"""A loopback media host for tests and benchmarks, on pytest-httpserver (threaded).

`MediaServer(root)` serves the files of a directory (written before or after it starts) at
`url/<name>`, optionally after `delay_s` per request (a slow host, so deadlines bite).
`expect(...)` adds any other response (redirects, errors) through pytest-httpserver's API.
"""

from __future__ import annotations

import io
import mimetypes
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response


class MediaServer:
    def __init__(self, root: str | Path, delay_s: float = 0.0):
        self.root = Path(root)
        self.delay_s = delay_s
        self.httpd = HTTPServer("127.0.0.1", 0, threaded=True)
        self.httpd.start()
        self.url = f"http://127.0.0.1:{self.httpd.port}"
        self._files_handler = None

    def _serve_file(self, request: Request) -> Response:
        if self.delay_s:
            time.sleep(self.delay_s)
        path = (self.root / request.path.lstrip("/")).resolve()
        if self.root.resolve() not in path.parents or not path.is_file():
            return Response(b"not found", status=404)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Response(path.read_bytes(), content_type=kind)

    def expect(self, uri, **kw):
        """pytest-httpserver's `expect_request` (checked before the directory's files)."""
        return self.httpd.expect_request(uri, **kw)

    def serve_files(self) -> MediaServer:
        """Serve the directory for every other path (call after any `expect`)."""
        self.httpd.expect_request(re.compile(r"^/.*")).respond_with_handler(self._serve_file)
        return self

    def add(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return f"{self.url}/{name}"

    def add_image(
        self, name: str, rgb: np.ndarray, exif_orientation: int | None = None, fmt: str = "PNG"
    ) -> str:
        return self.add(name, encode_image(rgb, exif_orientation, fmt))

    def close(self) -> None:
        self.httpd.clear()
        if self.httpd.is_running():
            self.httpd.stop()


def encode_image(rgb: np.ndarray, exif_orientation: int | None = None, fmt: str = "PNG") -> bytes:
    im = Image.fromarray(rgb)
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, format=fmt, exif=exif)
    else:
        im.save(buf, format=fmt)
    return buf.getvalue()
