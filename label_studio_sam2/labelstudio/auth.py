"""Label Studio's credentials for its media: the token handling of the adapter.

The media client (`label_studio_sam2.service.media.MediaClient`) is given these credentials
(its `MediaAuth` interface); it sends them only to Label Studio's own origin and media paths.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from http.cookiejar import DefaultCookiePolicy

import requests

from label_studio_sam2.service.errors import Kind, MediaError
from label_studio_sam2.service.settings import without_userinfo


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
        self.url = without_userinfo(url or "").rstrip("/")
        self._key = (api_key or "").strip()
        self._session = session or requests.Session()
        self._session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # keep no cookies
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

    @property
    def refreshable(self) -> bool:
        """A personal access token: its access token may be exchanged again after a 401."""
        return self.is_pat

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
                "LABEL_STUDIO_API_KEY is a personal access token but LABEL_STUDIO_URL is not set",
                Kind.DEPENDENCY_FAILED,
            )
        try:
            # never redirected: the refresh token goes to LABEL_STUDIO_URL's origin or nowhere
            r = self._session.post(
                f"{self.url}/api/token/refresh/",
                json={"refresh": self._key},
                timeout=self._timeout_s,
                allow_redirects=False,
            )
        except requests.RequestException as e:
            raise MediaError(
                f"cannot reach Label Studio at {self.url} to exchange the access token: {type(e).__name__}",
                Kind.DEPENDENCY_FAILED,
            ) from None
        if r.is_redirect:
            raise MediaError(
                f"Label Studio redirected the token exchange (HTTP {r.status_code}); it is not followed: "
                "set LABEL_STUDIO_URL to the address Label Studio answers on (scheme, host and port)",
                Kind.DEPENDENCY_FAILED,
            )
        if r.status_code != 200:
            raise MediaError(
                f"Label Studio refused the personal access token (HTTP {r.status_code} from /api/token/refresh/): "
                "check LABEL_STUDIO_API_KEY",
                Kind.DEPENDENCY_FAILED,
            )
        try:
            access = r.json().get("access", "")
        except (ValueError, AttributeError):
            access = ""
        if not isinstance(access, str) or not access:
            raise MediaError(
                "Label Studio's /api/token/refresh/ answered without an access token", Kind.DEPENDENCY_FAILED
            )
        payload = _jwt_payload(access) or {}
        self._access = access
        self._expires_at = float(payload.get("exp", time.time() + 240))
