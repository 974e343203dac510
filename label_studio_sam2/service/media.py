"""Fetching and decoding task media.

Resolves what Label Studio puts in task data (`/data/upload/...`, `/data/local-files/?d=...`,
absolute http(s) URLs, cloud URIs like `s3://` through LS's presign endpoint, `data:` URIs),
sends the credentials it is given (`MediaAuth`, injected: Label Studio's token handling is the
adapter's, `label_studio_sam2.labelstudio.auth`) to that one origin only, enforces size limits and
reads images with their EXIF orientation applied. One loader for the interactive path, bulk
pre-annotation and the CLI.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import http.client
import io
import ipaddress
import logging
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urljoin, urlsplit

import certifi
import numpy as np
import urllib3
from PIL import Image, ImageOps
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util.ssl_match_hostname import CertificateError

from label_studio_sam2.service.errors import Kind, MediaError

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi", "gcs")


# --- credentials -------------------------------------------------------------------------------


class MediaAuth(Protocol):
    """The credentials the media client is given (injected: the service has none of its own).
    Label Studio's adapter gives `label_studio_sam2.labelstudio.auth.LabelStudioAuth`.

    `url`: the origin that gets the credentials, and that relative media paths and cloud URIs
    are resolved against ("" for none); `configured`: there are credentials to send;
    `refreshable`: after a 401, `invalidate()` and `headers()` again may succeed (a short-lived
    access token); `headers()`: the Authorization headers (may raise MediaError when they cannot
    be had). Secrets never appear in `repr` or in errors.
    """

    url: str

    @property
    def configured(self) -> bool: ...

    @property
    def refreshable(self) -> bool: ...

    def headers(self) -> dict[str, str]: ...

    def invalidate(self) -> None: ...


class NoAuth:
    """No credentials and no home origin: only absolute http(s) and data: URLs are fetched."""

    url = ""
    configured = False
    refreshable = False

    def headers(self) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        pass


# --- the fetch policy ---------------------------------------------------------------------------

# Cloud metadata services. Most sit in link-local or private space (refused anyway); Azure's
# WireServer and Alibaba's service do not, so they are named.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure IMDS, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "168.63.129.16",  # Azure WireServer (a public address)
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_6TO4 = ipaddress.ip_network("2002::/16")

# Hosts trusted like Label Studio's own host, for this process only. Empty in a deployment; the
# test suite puts its loopback media server (127.0.0.1) here, because the default policy refuses
# loopback and MEDIA_ALLOWED_HOSTS would switch every other host off.
TRUSTED_FOR_TESTS: set[str] = set()


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The rule that forbids fetching from `ip`, or None for a public address."""
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.version == 6:
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            why = address_refusal(embedded)
            return f"{why} embedded in an IPv6 address" if why else None
    for test, rule in (
        (ip.is_loopback, "loopback"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.version == 4 and ip in _SHARED, "shared address space (100.64.0.0/10)"),
        (ip.version == 6 and ip in ipaddress.ip_network("fc00::/7"), "unique-local IPv6"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
        (not ip.is_global, "not a public address"),
    ):
        if test:
            return f"a {rule} address"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, compatible, NAT64, 6to4, Teredo), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    packed = ip.packed
    if packed[:12] == bytes(12) and int(ip) > 1:  # IPv4-compatible ::a.b.c.d (not :: or ::1)
        return ipaddress.IPv4Address(packed[12:])
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(packed[12:])
    if ip in _6TO4:
        return ipaddress.IPv4Address(packed[2:6])
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")  # DNS labels (and Docker's service_names)

# The paths Label Studio 1.23 serves media under (label_studio/*/urls.py): uploads, local files,
# the storage proxy, and the resolve/presign redirects of cloud storage. The token goes to these
# only; nothing else on Label Studio's origin (its /api/ above all) is fetched for a task.
_LS_MEDIA_PATH = re.compile(
    r"data/upload/[^?#]+|data/local-files/?|storage-data/[^?#]+|(?:tasks|projects)/[0-9]{1,18}/(?:resolve|presign)/?"
)
LS_MEDIA_PATHS = "/data/upload/, /data/local-files/, /storage-data/, /tasks/ID/resolve/"


@dataclass(frozen=True)
class Target:
    """A media URL parsed once (by urllib3, which the download uses too) and checked.

    host: lower-case name or IP literal (IPv6 without brackets); address: the resolved address
    that was checked and that the connection goes to.
    """

    scheme: str
    host: str
    port: int
    request_uri: str
    address: str = ""

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:  # fit for messages: no query string (presigned URLs carry credentials)
        return f"{self.scheme}://{self.host_header}{self.request_uri.split('?')[0]}"[:200]


def parse_target(url: str) -> Target:
    """Parse an absolute http(s) URL, refusing every spelling two URL parsers could read
    differently: backslashes, userinfo, control characters, spaces or non-ASCII in the host,
    percent signs in the host, and host names that are not plain DNS names or canonical IP
    literals. Spaces and non-ASCII in the path and query are percent-encoded."""
    if not isinstance(url, str) or any(c < " " or c in "\\\x7f" for c in url):
        raise MediaError(f"refusing media URL {_shown(url)}: control characters or backslashes")
    scheme, sep, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0] if sep else ""
    # spaces and non-ASCII in the path are percent-encoded (file names have them); never in the host
    if not authority.isascii() or " " in authority:
        raise MediaError(f"refusing media URL {_shown(url)}: spaces or non-ASCII in the host")
    if scheme.lower() not in ("http", "https") or not authority:
        raise MediaError(f"refusing media URL {_shown(url)}: expected http:// or https:// with a host")
    if "@" in authority:
        raise MediaError(
            f"refusing media URL {_shown(url)}: user names and passwords in URLs are not allowed"
        )
    if "%" in authority:
        raise MediaError(f"refusing media URL {_shown(url)}: percent-encoded host")
    try:
        parsed = urllib3.util.parse_url(url)
        other = urlsplit(url)
        other_host, other_port = other.hostname, other.port
    except (urllib3.exceptions.LocationParseError, ValueError):
        raise MediaError(f"refusing media URL {_shown(url)}: invalid host or port") from None
    host = (parsed.host or "").lower()
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MediaError(f"refusing media URL {_shown(url)}: invalid IPv6 address") from None
    else:
        labels = host.removesuffix(".").split(".")
        if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
            raise MediaError(f"refusing media URL {_shown(url)}: {host[:80]!r} is not a valid host name")
        if labels[-1].isdigit() or labels[-1].startswith("0x"):  # an IPv4 address: canonical only
            try:
                canonical = str(ipaddress.IPv4Address(host)) == host
            except ValueError:
                canonical = False
            if not canonical:
                raise MediaError(f"refusing media URL {_shown(url)}: unusual spelling of an IP address")
    port = parsed.port if parsed.port is not None else (443 if parsed.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise MediaError(f"refusing media URL {_shown(url)}: invalid port")
    if other_host != host or (other_port or port) != port:  # the two parsers must agree
        raise MediaError(f"refusing media URL {_shown(url)}: ambiguous host")
    return Target(parsed.scheme, host, port, parsed.request_uri or "/")


def _shown(url) -> str:
    """A URL fit for messages: no query string (presigned credentials), no user:password@."""
    text = re.sub(r"//[^/?#]*@", "//***@", str(url).split("?")[0])
    return repr(text[:80])


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal is itself)."""
    try:
        return [ipaddress.ip_address(host).compressed]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise MediaError(f"cannot resolve media host {host[:80]!r}", Kind.UPSTREAM_FAILED) from None
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass
class MediaLimits:
    max_bytes: int = 200 << 20  # per download
    max_pixels: int = 120_000_000  # decompression-bomb guard (a 12 MP photo is 12_000_000)
    timeout_s: float = 30.0  # connect, and each read
    # Hosts task URLs may point at besides Label Studio's own (MEDIA_ALLOWED_HOSTS). Empty: any
    # host whose every address is public. Listed: only these, whatever their addresses (never a
    # cloud metadata address).
    allowed_hosts: tuple[str, ...] = ()
    deadline_s: float = 120.0  # a whole download, redirects included: connect to the last byte
    ca_certs: str | None = None  # CA bundle for https (None: certifi's, as requests uses)
    resolver: Callable[[str, int], list[str]] = resolve_host  # host, port -> addresses


_request_deadline: ContextVar[float | None] = ContextVar("media_request_deadline", default=None)


@contextmanager
def request_deadline(deadline: float) -> Iterator[None]:
    """Downloads started inside end by `deadline` (time.monotonic()) at the latest."""
    token = _request_deadline.set(deadline)
    try:
        yield
    finally:
        _request_deadline.reset(token)


class _Deadline:
    """One download's time limit, from connect to the last byte: when it passes, the socket of
    the connection in use is shut down, which ends any read blocked on it (a server trickling
    its status line, headers or body one byte at a time never trips a per-read timeout)."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + max(0.0, seconds)
        self.expired = threading.Event()
        self.conn: HTTPConnection | None = None
        self._timer = threading.Timer(max(0.0, seconds), self._cut)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        """The limit has passed: cut by the timer, or a read that timed out at the limit before
        the timer thread ran (under load it runs late; the error must still name the deadline)."""
        return self.expired.is_set() or time.monotonic() >= self.at - 0.05

    def _cut(self) -> None:
        self.expired.set()
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


_REDIRECTS = (301, 302, 303, 307, 308)
_NETWORK_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError, CertificateError)


class MediaClient:
    """Downloads task media. Each URL is parsed once (urllib3), its host resolved once and every
    address checked; the connection goes to the checked address with the URL's Host header and
    TLS server name. Only Label Studio's exact origin gets the token; no cookies are kept."""

    def __init__(self, auth: MediaAuth | None = None, limits: MediaLimits | None = None):
        self.auth = auth if auth is not None else NoAuth()
        self.limits = limits or MediaLimits()
        self._ls: Target | None = None
        if self.auth.url:
            try:
                self._ls = parse_target(auth.url)
            except MediaError as e:
                log.warning("LABEL_STUDIO_URL cannot be used for media: %s", e.message)

    def resolve(self, url: str, task_id: int | None = None) -> str:
        """Task data value -> absolute URL to download."""
        if not isinstance(url, str):
            raise MediaError("the task's media URL must be a string")
        scheme = url.partition(":")[0].lower() if ":" in url else ""
        if scheme in CLOUD_SCHEMES:
            if not self.auth.url or task_id is None:
                raise MediaError(
                    f"{scheme}:// media needs LABEL_STUDIO_URL and a task id to be presigned by Label Studio"
                )
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            # Label Studio's redirect to a presigned URL (served at /tasks/, not under /api/)
            return f"{self.auth.url}/tasks/{int(task_id)}/presign/?fileuri={fileuri}"
        if scheme in ("http", "https"):
            return url
        if url.startswith("/"):
            if not self.auth.url:
                raise MediaError(
                    f"media path {url[:80]!r} is relative to Label Studio: set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY)",
                    Kind.DEPENDENCY_FAILED,
                )
            return urljoin(self.auth.url + "/", url.lstrip("/"))
        raise MediaError(
            f"unsupported media URL {url[:80]!r}: expected http(s), /data/..., s3://, gs://, azure-blob:// or data:"
        )

    def _is_label_studio(self, target: Target) -> bool:
        """`target` is on Label Studio's exact origin: scheme, host and port (not its host on any
        port)."""
        return self._ls is not None and target.origin == self._ls.origin

    def _is_label_studio_media(self, target: Target) -> bool:
        """`target`'s path (below LABEL_STUDIO_URL's own path) is one Label Studio serves media
        under; percent-encoded dots or slashes and empty segments never are."""
        prefix = self._ls.request_uri.split("?")[0].rstrip("/") + "/" if self._ls is not None else "/"
        path = target.request_uri.split("?")[0]
        if not path.startswith(prefix):
            return False
        rest = path[len(prefix) :]
        if re.search(r"%(2e|2f|5c)", rest, re.IGNORECASE):  # an encoded dot, slash or backslash
            return False
        decoded = unquote(rest)
        if "//" in decoded or any(part in (".", "..") for part in decoded.split("/")):
            return False
        return bool(_LS_MEDIA_PATH.fullmatch(rest))

    def check(self, target: Target) -> Target:
        """Apply the fetch policy to `target`: resolve its host once and check every address.
        Returns the target with the address the connection must go to; raises MediaError (403)
        naming the rule otherwise."""
        host = target.host
        if self._is_label_studio(target) and not self._is_label_studio_media(target):
            # one message whatever the path: nothing is connected to, no status is told
            raise MediaError(
                f"refusing media URL {target}: on Label Studio only its media paths are fetched "
                f"({LS_MEDIA_PATHS})",
                Kind.REFUSED,
            )
        # Label Studio's exact origin is trusted (its address may be private); its host on
        # another port is not: that is checked like any host, and refused before connecting
        trusted = self._is_label_studio(target) or host in TRUSTED_FOR_TESTS
        allowed = self.limits.allowed_hosts
        listed = host in allowed
        if allowed and not (listed or trusted):
            raise MediaError(f"refusing media host {host!r}: it is not in MEDIA_ALLOWED_HOSTS", Kind.REFUSED)
        addresses = self.limits.resolver(host, target.port)
        if not addresses:
            raise MediaError(f"cannot resolve media host {host!r}", Kind.UPSTREAM_FAILED)
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            why = address_refusal(ip)
            if why is None or trusted or (listed and "metadata" not in why):
                continue
            hint = "" if allowed else " (list the host in MEDIA_ALLOWED_HOSTS if it is yours)"
            raise MediaError(f"refusing media host {host!r}: {address} is {why}{hint}", Kind.REFUSED)
        return dataclasses.replace(target, address=addresses[0])

    def _connection(self, target: Target, timeout_s: float) -> HTTPConnection:
        if target.scheme == "https":
            return HTTPSConnection(
                target.address,
                target.port,
                timeout=timeout_s,
                server_hostname=target.host,
                assert_hostname=target.host,
                cert_reqs="CERT_REQUIRED",
                ca_certs=self.limits.ca_certs or certifi.where(),
            )
        return HTTPConnection(target.address, target.port, timeout=timeout_s)

    def _get(self, target: Target, headers: dict, deadline: _Deadline) -> urllib3.BaseHTTPResponse:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise self._too_slow(target)
        conn = self._connection(target, min(self.limits.timeout_s, remaining))
        deadline.conn = conn
        try:
            conn.request(
                "GET", target.request_uri, headers=headers, preload_content=False, decode_content=False
            )
            resp = conn.getresponse()
        except _NETWORK_ERRORS as e:
            conn.close()
            raise self._network_error(target, e, deadline) from None
        if deadline.passed():
            resp.close()
            conn.close()
            raise self._too_slow(target)
        resp._sam2_conn = conn  # closed with the response
        return resp

    def _too_slow(self, target: Target) -> MediaError:
        return MediaError(
            f"download of {target} took longer than {self.limits.deadline_s:g} s", Kind.TIMED_OUT
        )

    def _network_error(self, target: Target, e: Exception, deadline: _Deadline) -> MediaError:
        if deadline.passed():
            return self._too_slow(target)
        if isinstance(e, (TimeoutError, urllib3.exceptions.TimeoutError)):
            return MediaError(
                f"timed out after {self.limits.timeout_s:g} s fetching {target}", Kind.TIMED_OUT
            )
        return MediaError(f"cannot fetch {target}: {type(e).__name__}", Kind.UPSTREAM_FAILED)

    def _open(self, url: str, deadline: _Deadline) -> urllib3.BaseHTTPResponse:
        """GET with auth for Label Studio, following redirects by hand so that every hop is
        parsed and checked, and the token never travels to another origin."""
        for _hop in range(6):
            target = self.check(parse_target(url))
            headers = {
                "Host": target.host_header,
                "Accept-Encoding": "identity",
                "User-Agent": "label-studio-sam2",
            }
            to_ls = self._is_label_studio(target) and self.auth.configured
            if to_ls:
                headers.update(self.auth.headers())
            resp = self._get(target, headers, deadline)
            if resp.status == 401 and to_ls and self.auth.refreshable:
                _close(resp)
                self.auth.invalidate()
                headers.update(self.auth.headers())
                resp = self._get(target, headers, deadline)
            if resp.status in _REDIRECTS:
                location = resp.headers.get("Location", "")
                _close(resp)
                if not location:
                    raise MediaError(
                        f"HTTP {resp.status} without a Location fetching {target}", Kind.UPSTREAM_FAILED
                    )
                base = f"{target.scheme}://{target.host_header}{target.request_uri}"
                try:
                    url = urljoin(base, location)
                except ValueError:
                    raise MediaError(
                        f"malformed redirect Location fetching {target}", Kind.UPSTREAM_FAILED
                    ) from None
                continue
            if resp.status != 200:
                _close(resp)
                hint = " (check LABEL_STUDIO_API_KEY)" if resp.status in (401, 403) and to_ls else ""
                raise MediaError(
                    f"HTTP {resp.status} fetching {target}{hint}",
                    Kind.NOT_FOUND if resp.status == 404 else Kind.UPSTREAM_FAILED,
                )
            return resp
        raise MediaError(f"too many redirects fetching {_shown(url)}", Kind.UPSTREAM_FAILED)

    def _chunks(self, url: str) -> Iterator[bytes]:
        seconds = self.limits.deadline_s
        request_end = _request_deadline.get()
        if request_end is not None:
            seconds = min(seconds, request_end - time.monotonic())
        deadline = _Deadline(seconds)
        try:
            resp = self._open(url, deadline)
            target_text = _shown(url)
            try:
                declared = resp.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self.limits.max_bytes:
                    raise MediaError(
                        f"media is {int(declared) >> 20} MB, over the {self.limits.max_bytes >> 20} MB limit",
                        Kind.TOO_LARGE,
                    )
                total = 0
                for chunk in resp.stream(1 << 16):
                    total += len(chunk)
                    if total > self.limits.max_bytes:
                        raise MediaError(
                            f"media is over the {self.limits.max_bytes >> 20} MB limit", Kind.TOO_LARGE
                        )
                    if deadline.passed():
                        break
                    yield chunk
                if deadline.passed():  # a body without a length just ends when cut
                    raise MediaError(
                        f"download of {target_text} took longer than {seconds:g} s", Kind.TIMED_OUT
                    )
            except _NETWORK_ERRORS as e:
                if deadline.passed():
                    raise MediaError(
                        f"download of {target_text} took longer than {seconds:g} s", Kind.TIMED_OUT
                    ) from None
                if isinstance(e, (TimeoutError, urllib3.exceptions.TimeoutError)):
                    raise MediaError(
                        f"timed out after {self.limits.timeout_s:g} s fetching {target_text}", Kind.TIMED_OUT
                    ) from None
                raise MediaError(
                    f"download of {target_text} broke off: {type(e).__name__}", Kind.UPSTREAM_FAILED
                ) from None
            finally:
                _close(resp)
        finally:
            deadline.cancel()

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        """The bytes of a task's media."""
        if isinstance(url, str) and url.startswith("data:"):
            return _data_uri(url, self.limits.max_bytes)
        return b"".join(self._chunks(self.resolve(url, task_id)))

    def download_to_file(self, url: str, task_id: int | None = None, suffix: str = "") -> Path:
        """Stream media to a temporary file (videos); the caller deletes it."""
        suffix = suffix or Path(urlsplit(url).path).suffix
        if not re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix):
            suffix = ""
        fd, name = tempfile.mkstemp(prefix="ls-sam2-", suffix=suffix)
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

    @contextmanager
    def lazy_file(self, url: str, task_id: int | None = None) -> Iterator[Callable[[], str]]:
        """A function that downloads the media to a temporary file when called and returns its
        path (a video is fetched only once there is something to track); what it downloaded is
        deleted on exit."""
        paths: list[Path] = []

        def download() -> str:
            paths.append(self.download_to_file(url, task_id))
            return str(paths[-1])

        try:
            yield download
        finally:
            for path in paths:
                path.unlink(missing_ok=True)

    def load_image(self, url: str, task_id: int | None = None) -> ImageFile:
        return open_image(self.fetch(url, task_id), self.limits.max_pixels)


def _close(resp) -> None:
    resp.close()
    conn = getattr(resp, "_sam2_conn", None)
    if conn is not None:
        conn.close()


def _data_uri(url: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise MediaError("only base64 data: URIs are supported")
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaError("data: URI is over the size limit", Kind.TOO_LARGE)
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
                    f"image is {w}x{h} = {w * h / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit",
                    Kind.TOO_LARGE,
                )
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(f"image is over the {max_pixels / 1e6:.0f} MP limit", Kind.TOO_LARGE) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"the media is not an image Pillow can read ({type(e).__name__})") from None
    if orientation in _TRANSPOSED:
        w, h = h, w
    return ImageFile(hashlib.sha256(data).hexdigest(), w, h, data, max_pixels)


# Pillow's own bomb check triggers at 2x MAX_IMAGE_PIXELS; ours (MediaLimits.max_pixels) is
# checked first with a clear message, so only raise Pillow's ceiling to match it.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MediaLimits.max_pixels)
