"""Media: URL resolution, Label Studio token handling, EXIF, limits."""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
from flask import Flask, abort, request
from werkzeug.serving import make_server

from label_studio_sam2.labelstudio.auth import LabelStudioAuth
from label_studio_sam2.service.errors import MediaError
from label_studio_sam2.service.media import MediaClient, MediaLimits, open_image
from tests.conftest import encode_image, noise_image


def _jwt(payload: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(payload)}.c2lnbmF0dXJl"


PAT = _jwt({"token_type": "refresh", "exp": time.time() + 3600, "jti": "pat"})
LEGACY = "0123456789abcdef0123456789abcdef01234567"


class FakeLabelStudio:
    """Just enough of Label Studio: token refresh, uploads behind auth, presign redirects."""

    def __init__(self, image: bytes, access_ttl_s: float = 300):
        self.refreshes = 0
        self.image = image
        self.access_ttl_s = access_ttl_s
        self.valid_access: set[str] = set()
        app = Flask("fake-ls")

        @app.post("/api/token/refresh/")
        def refresh():
            if request.json.get("refresh") != PAT:
                abort(401)
            self.refreshes += 1
            token = _jwt(
                {"token_type": "access", "exp": time.time() + self.access_ttl_s, "n": self.refreshes}
            )
            self.valid_access.add(token)
            return {"access": token}

        @app.get("/data/upload/1/a.png")
        def upload():
            auth = request.headers.get("Authorization", "")
            if auth == f"Token {LEGACY}" or (auth.startswith("Bearer ") and auth[7:] in self.valid_access):
                return self.image, 200, {"Content-Type": "image/png"}
            abort(401)

        @app.get("/tasks/<int:task_id>/presign/")  # where Label Studio 1.23 serves it (not under /api/)
        def presign(task_id):
            uri = base64.urlsafe_b64decode(request.args["fileuri"]).decode()
            assert uri == "s3://bucket/a.png"
            return "", 302, {"Location": "/data/upload/1/a.png"}

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def fake_ls():
    ls = FakeLabelStudio(encode_image(noise_image(12, 20)))
    yield ls
    ls.close()


def test_personal_access_token_is_exchanged_and_reused(fake_ls):
    media = MediaClient(LabelStudioAuth(fake_ls.url, PAT))
    assert open_image(media.fetch("/data/upload/1/a.png")).width == 20
    media.fetch("/data/upload/1/a.png")
    assert fake_ls.refreshes == 1  # one exchange serves many downloads


class InjectedAuth:
    """Credentials of some other tool: the media client's `MediaAuth` interface, nothing of
    Label Studio's token handling."""

    configured = True
    refreshable = False

    def __init__(self, url: str, header: str):
        self.url, self.header, self.asked = url, header, 0

    def headers(self) -> dict[str, str]:
        self.asked += 1
        return {"Authorization": self.header}

    def invalidate(self) -> None:
        pass


def test_the_media_client_sends_the_credentials_it_is_given_to_their_origin_only(fake_ls, media_server):
    auth = InjectedAuth(fake_ls.url, f"Token {LEGACY}")
    media = MediaClient(auth)
    assert media.fetch("/data/upload/1/a.png") == fake_ls.image  # relative: the given origin
    assert auth.asked == 1 and fake_ls.refreshes == 0
    other = media_server.add_image("b.png", noise_image(4, 4))  # another origin gets no credentials
    media.fetch(other)
    assert auth.asked == 1
    with pytest.raises(MediaError, match="401"):
        MediaClient(InjectedAuth(fake_ls.url, "Token wrong")).fetch("/data/upload/1/a.png")
    with pytest.raises(MediaError, match="LABEL_STUDIO_URL"):
        MediaClient().fetch("/data/upload/1/a.png")  # no credentials given: no home origin either


def test_expired_access_token_is_refreshed(fake_ls):
    fake_ls.access_ttl_s = 10  # less than the 30 s safety margin: every call refreshes
    media = MediaClient(LabelStudioAuth(fake_ls.url, PAT))
    media.fetch("/data/upload/1/a.png")
    media.fetch("/data/upload/1/a.png")
    assert fake_ls.refreshes == 2


def test_revoked_access_token_gets_one_retry(fake_ls):
    media = MediaClient(LabelStudioAuth(fake_ls.url, PAT))
    media.fetch("/data/upload/1/a.png")
    fake_ls.valid_access.clear()  # LS forgot the access token (restart, rotation)
    assert media.fetch("/data/upload/1/a.png") == fake_ls.image
    assert fake_ls.refreshes == 2


def test_legacy_token_is_sent_as_token(fake_ls):
    media = MediaClient(LabelStudioAuth(fake_ls.url, LEGACY))
    assert media.fetch(f"{fake_ls.url}/data/upload/1/a.png") == fake_ls.image


def test_wrong_token_error_names_the_setting_but_not_the_token(fake_ls):
    bad = LEGACY[::-1]
    media = MediaClient(LabelStudioAuth(fake_ls.url, bad))
    with pytest.raises(MediaError) as e:
        media.fetch("/data/upload/1/a.png")
    assert "401" in e.value.message and "LABEL_STUDIO_API_KEY" in e.value.message
    assert bad not in e.value.message
    bad_pat = _jwt({"token_type": "refresh", "jti": "other"})
    with pytest.raises(MediaError) as e:
        MediaClient(LabelStudioAuth(fake_ls.url, bad_pat)).fetch("/data/upload/1/a.png")
    assert bad_pat not in e.value.message and bad_pat not in repr(LabelStudioAuth(fake_ls.url, bad_pat))


def test_cloud_uri_is_presigned_by_label_studio(fake_ls):
    media = MediaClient(LabelStudioAuth(fake_ls.url, PAT))
    assert media.fetch("s3://bucket/a.png", task_id=7) == fake_ls.image


def test_relative_path_without_label_studio_url_says_what_to_set():
    with pytest.raises(MediaError, match="LABEL_STUDIO_URL"):
        MediaClient(LabelStudioAuth(None, None)).fetch("/data/upload/1/a.png")


def test_404_and_size_limit(media_server):
    media = MediaClient(LabelStudioAuth(None, None), MediaLimits(max_bytes=1000))
    with pytest.raises(MediaError, match="404"):
        media.fetch(media_server.url + "/missing.png")
    url = media_server.add("big.bin", b"x" * 5000)
    with pytest.raises(MediaError, match="limit"):
        media.fetch(url)


def test_data_uri():
    png = encode_image(noise_image(3, 4))
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert MediaClient(LabelStudioAuth(None, None)).fetch(uri) == png


def test_link_local_metadata_address_is_refused():
    media = MediaClient(LabelStudioAuth(None, None), MediaLimits(timeout_s=1))
    with pytest.raises(MediaError, match="metadata"):
        media.fetch("http://169.254.169.254/latest/meta-data/")


@pytest.mark.parametrize("orientation, swapped", [(1, False), (3, False), (6, True), (8, True)])
def test_exif_orientation_gives_the_displayed_size_and_pixels(orientation, swapped):
    rgb = noise_image(30, 50)
    rgb[:5, :10] = 255  # a white patch top-left of the stored pixels
    img = open_image(encode_image(rgb, orientation, "JPEG"))
    assert (img.width, img.height) == ((30, 50) if swapped else (50, 30))
    shown = img.load()
    assert shown.shape == (img.height, img.width, 3)
    # where the white patch is after rotation tells the transpose really happened
    expected_corner = {1: (0, 0), 3: (-1, -1), 6: (0, -1), 8: (-1, 0)}[orientation]
    ys = slice(0, 5) if expected_corner[0] == 0 else slice(-5, None)
    xs = slice(0, 5) if expected_corner[1] == 0 else slice(-5, None)
    assert shown[ys, xs].mean() > 200


def test_not_an_image_and_empty_and_bomb():
    with pytest.raises(MediaError, match="not an image"):
        open_image(b"<html>404</html>")
    with pytest.raises(MediaError, match="empty"):
        open_image(b"")
    big = encode_image(np.zeros((3000, 4000, 3), np.uint8))  # compresses to a few KB
    with pytest.raises(MediaError, match="MP limit"):
        open_image(big, max_pixels=5_000_000)


def test_content_key_is_the_same_for_the_same_bytes_from_any_url():
    data = encode_image(noise_image(8, 8))
    assert open_image(data).key == open_image(bytes(data)).key
    assert open_image(data).key != open_image(encode_image(noise_image(8, 8, seed=1))).key
