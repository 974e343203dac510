"""Fetching and decoding task media.

Resolves what Label Studio puts in task data (`/data/upload/...`, `/data/local-files/?d=...`,
absolute http(s) URLs, cloud URIs like `s3://` through LS's presign endpoint, `data:` URIs),
authenticates against Label Studio (personal access tokens exchanged for short-lived access
tokens, or legacy tokens), enforces size limits and reads images with their EXIF orientation
applied. One loader for the interactive path, bulk pre-annotation and the CLI.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import json
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import requests
from PIL import Image, ImageOps

from backend.errors import MediaError

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi", "gcs")


# --- Label Studio authentication ---------------------------------------------------------------


def _jwt_payload(token: str) -> dict | None:
    """The payload of a JWT, or None if `token` is not one (a legacy token is 40 hex chars)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, binascii.Error):
        return None
    return payload if isinstance(payload, dict) else None


class LabelStudioAuth:
    """Authorization headers for Label Studio.

    A personal access token (a JWT refresh token) is exchanged at /api/token/refresh/ for an
    access token (valid ~5 minutes), refreshed shortly before it expires or after a 401. A legacy
    token is sent as `Token <key>`. The key never appears in logs or error messages.
    """

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        session: requests.Session | None = None,
        timeout_s: float = 10,
    ):
        self.url = (url or "").rstrip("/")
        self._key = (api_key or "").strip()
        self._session = session or requests.Session()
        self._timeout_s = timeout_s
        self._access: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.is_pat = _jwt_payload(self._key) is not None

    def __repr__(self) -> str:  # never print the key
        return f"LabelStudioAuth(url={self.url!r}, kind={'pat' if self.is_pat else 'legacy' if self._key else 'none'})"

    @property
    def configured(self) -> bool:
        return bool(self._key)

    def headers(self) -> dict[str, str]:
        if not self._key:
            return {}
        if not self.is_pat:
            return {"Authorization": f"Token {self._key}"}
        with self._lock:
            if self._access is None or time.time() > self._expires_at - 30:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        with self._lock:
            self._access = None

    def _refresh(self) -> None:
        if not self.url:
            raise MediaError(
                "LABEL_STUDIO_API_KEY is a personal access token but LABEL_STUDIO_URL is not set", 424
            )
        try:
            r = self._session.post(
                f"{self.url}/api/token/refresh/", json={"refresh": self._key}, timeout=self._timeout_s
            )
        except requests.RequestException as e:
            raise MediaError(
                f"cannot reach Label Studio at {self.url} to exchange the access token: {type(e).__name__}",
                424,
            ) from None
        if r.status_code != 200:
            raise MediaError(
                f"Label Studio refused the personal access token (HTTP {r.status_code} from /api/token/refresh/): "
                "check LABEL_STUDIO_API_KEY",
                424,
            )
        access = r.json().get("access", "")
        payload = _jwt_payload(access) or {}
        self._access = access
        self._expires_at = float(payload.get("exp", time.time() + 240))


# --- fetching -------------------------------------------------------------------------------------


def _blocked_address(host: str) -> str | None:
    """Why `host` must never be fetched from (link-local, cloud metadata), or None."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return None  # let the request fail with its own, clearer error
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if (
            ip.is_link_local
            or ip.is_multicast
            or ip.is_unspecified
            or str(ip) in ("169.254.169.254", "fd00:ec2::254")
        ):
            return f"address {ip} of {host} is link-local/metadata"
    return None


@dataclass
class MediaLimits:
    max_bytes: int = 200 << 20  # per download
    max_pixels: int = 120_000_000  # decompression-bomb guard (a 12 MP photo is 12_000_000)
    timeout_s: float = 30.0  # connect, and each read
    allowed_hosts: tuple[str, ...] = ()  # empty: any host except link-local/metadata
    deadline_s: float = 120.0  # the whole body: a server trickling bytes cannot hold a worker


class MediaClient:
    """Downloads task media; LS URLs get auth headers, other hosts never see the token."""

    def __init__(
        self,
        auth: LabelStudioAuth,
        limits: MediaLimits | None = None,
        session: requests.Session | None = None,
    ):
        self.auth = auth
        self.limits = limits or MediaLimits()
        self.session = session or requests.Session()

    def resolve(self, url: str, task_id: int | None = None) -> str:
        """Task data value -> absolute URL to download."""
        parsed = urlparse(url)
        scheme = parsed.scheme.lower()
        if scheme in CLOUD_SCHEMES:
            if not self.auth.url or task_id is None:
                raise MediaError(
                    f"{scheme}:// media needs LABEL_STUDIO_URL and a task id to be presigned by Label Studio"
                )
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return f"{self.auth.url}/api/tasks/{task_id}/presign/?fileuri={fileuri}"
        if scheme in ("http", "https"):
            return url
        if scheme == "" and url.startswith("/"):
            if not self.auth.url:
                raise MediaError(
                    f"media path {url[:80]!r} is relative to Label Studio: set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY)",
                    424,
                )
            return urljoin(self.auth.url + "/", url.lstrip("/"))
        raise MediaError(
            f"unsupported media URL {url[:80]!r}: expected http(s), /data/..., s3://, gs://, azure-blob:// or data:"
        )

    def _is_label_studio(self, url: str) -> bool:
        if not self.auth.url:
            return False
        a, b = urlparse(url), urlparse(self.auth.url)
        return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)

    def _check_host(self, url: str) -> None:
        host = urlparse(url).hostname or ""
        if self._is_label_studio(url):
            return
        allowed = self.limits.allowed_hosts
        if allowed and host not in allowed:
            raise MediaError(f"media host {host!r} is not in MEDIA_ALLOWED_HOSTS", 403)
        reason = _blocked_address(host)
        if reason:
            raise MediaError(f"refusing to fetch media: {reason}", 403)

    def _open(self, url: str) -> requests.Response:
        """GET with auth for LS, following redirects by hand so every hop is checked and the
        token never travels to another host."""
        for _hop in range(5):
            self._check_host(url)
            headers = self.auth.headers() if self._is_label_studio(url) and self.auth.configured else {}
            try:
                r = self.session.get(
                    url, headers=headers, stream=True, timeout=self.limits.timeout_s, allow_redirects=False
                )
                if r.status_code == 401 and headers and self.auth.is_pat:
                    r.close()
                    self.auth.invalidate()
                    r = self.session.get(
                        url,
                        headers=self.auth.headers(),
                        stream=True,
                        timeout=self.limits.timeout_s,
                        allow_redirects=False,
                    )
            except requests.Timeout:
                raise MediaError(
                    f"timed out after {self.limits.timeout_s:g} s fetching {_safe(url)}", 504
                ) from None
            except requests.RequestException as e:
                raise MediaError(f"cannot fetch {_safe(url)}: {type(e).__name__}", 502) from None
            if r.is_redirect:
                location = r.headers.get("Location", "")
                r.close()
                url = urljoin(url, location)
                continue
            if r.status_code != 200:
                r.close()
                hint = " (check LABEL_STUDIO_API_KEY)" if r.status_code in (401, 403) and headers else ""
                raise MediaError(
                    f"HTTP {r.status_code} fetching {_safe(url)}{hint}", 404 if r.status_code == 404 else 502
                )
            return r
        raise MediaError(f"too many redirects fetching {_safe(url)}", 502)

    def _chunks(self, url: str) -> Iterator[bytes]:
        r = self._open(url)
        with r:
            declared = r.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.limits.max_bytes:
                raise MediaError(
                    f"media is {int(declared) >> 20} MB, over the {self.limits.max_bytes >> 20} MB limit", 413
                )
            total = 0
            # Every read returns within timeout_s, but a byte every few seconds never trips it:
            # past the deadline the socket is shut down from a timer, which ends the blocked read.
            expired = threading.Event()
            timer = threading.Timer(self.limits.deadline_s, _shutdown, (r, expired))
            timer.daemon = True
            timer.start()
            too_slow = MediaError(
                f"download of {_safe(url)} took longer than {self.limits.deadline_s:g} s", 504
            )
            try:
                for chunk in r.iter_content(1 << 16):
                    total += len(chunk)
                    if total > self.limits.max_bytes:
                        raise MediaError(f"media is over the {self.limits.max_bytes >> 20} MB limit", 413)
                    if expired.is_set():
                        raise too_slow
                    yield chunk
            except requests.RequestException as e:
                if expired.is_set():
                    raise too_slow from None
                raise MediaError(f"download of {_safe(url)} broke off: {type(e).__name__}", 502) from None
            finally:
                timer.cancel()
            if expired.is_set():  # a body without a length just ends when its socket is shut
                raise too_slow

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        """The bytes of a task's media."""
        if url.startswith("data:"):
            return _data_uri(url, self.limits.max_bytes)
        return b"".join(self._chunks(self.resolve(url, task_id)))

    def download_to_file(self, url: str, task_id: int | None = None, suffix: str = "") -> Path:
        """Stream media to a temporary file (videos); the caller deletes it."""
        fd, name = tempfile.mkstemp(prefix="ls-sam2-", suffix=suffix or Path(urlparse(url).path).suffix)
        try:
            with open(fd, "wb") as f:
                if url.startswith("data:"):
                    f.write(_data_uri(url, self.limits.max_bytes))
                else:
                    for chunk in self._chunks(self.resolve(url, task_id)):
                        f.write(chunk)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def load_image(self, url: str, task_id: int | None = None) -> ImageFile:
        return open_image(self.fetch(url, task_id), self.limits.max_pixels)


def _shutdown(r: requests.Response, expired: threading.Event) -> None:
    expired.set()
    try:
        r.raw.shutdown()  # urllib3 >= 2.3: safe from another thread
    except Exception:  # an older urllib3 or a closed connection: close as well as we can
        r.close()


def _safe(url: str) -> str:
    """A URL fit for messages: no query string (presigned URLs carry credentials there)."""
    p = urlparse(url)
    return f"{p.scheme}://{p.netloc}{p.path}"[:200]


def _data_uri(url: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise MediaError("only base64 data: URIs are supported")
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaError("data: URI is over the size limit", 413)
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise MediaError("data: URI is not valid base64") from None


# --- images ------------------------------------------------------------------------------------


@dataclass
class ImageFile:
    """An image as the user sees it in Label Studio.

    key: sha256 of the file bytes (identifies the content for the embedding cache).
    width, height: the displayed size, after EXIF orientation.
    load(): the (height, width, 3) uint8 RGB pixels, decoded on demand (a cache hit skips it).
    """

    key: str
    width: int
    height: int
    data: bytes
    max_pixels: int

    def load(self) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(self.data)) as im:
                im = ImageOps.exif_transpose(im)
                rgb = np.array(im.convert("RGB"))  # writable: torch.from_numpy needs it
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise MediaError(f"cannot decode the image: {e}") from None
        if rgb.shape[:2] != (self.height, self.width):
            raise MediaError(
                f"decoded image is {rgb.shape[1]}x{rgb.shape[0]}, header said {self.width}x{self.height}"
            )
        return rgb


_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height


def open_image(data: bytes, max_pixels: int = MediaLimits.max_pixels) -> ImageFile:
    """Read an image's header: size after EXIF orientation, content key. Raises MediaError for
    bytes that are not an image or an image over `max_pixels` (decompression bombs)."""
    if not data:
        raise MediaError("the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise MediaError(
                    f"image is {w}x{h} = {w * h / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit", 413
                )
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(f"image is over the {max_pixels / 1e6:.0f} MP limit", 413) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"the media is not an image Pillow can read ({type(e).__name__})") from None
    if orientation in _TRANSPOSED:
        w, h = h, w
    return ImageFile(hashlib.sha256(data).hexdigest(), w, h, data, max_pixels)


# Pillow's own bomb check triggers at 2x MAX_IMAGE_PIXELS; ours (MediaLimits.max_pixels) is
# checked first with a clear message, so only raise Pillow's ceiling to match it.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MediaLimits.max_pixels)
