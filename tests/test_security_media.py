"""Media fetching against hostile task URLs: one parser for checking and connecting, the default
address policy, the token only for Label Studio's origin, time limits from connect to last byte,
malformed URLs as per-task errors. Real servers on loopback aliases (tests/security_servers.py)."""

from __future__ import annotations

import contextlib
import string
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from label_studio_sam2.labelstudio.auth import LabelStudioAuth
from label_studio_sam2.labelstudio.middleware import http_status
from label_studio_sam2.service import media as media_module
from label_studio_sam2.service.errors import MediaError
from label_studio_sam2.service.media import (
    MediaClient,
    MediaLimits,
    parse_target,
    request_deadline,
)
from tests.conftest import encode_image, noise_image
from tests.security_servers import RecordingServer, free_port_on, send, trickle

LEGACY = "0123456789abcdef0123456789abcdef01234567"
UPLOAD = "/data/upload/1/a.png"
PNG = encode_image(noise_image(6, 8))


@pytest.fixture(autouse=True)
def _nothing_trusted(monkeypatch):
    monkeypatch.setattr(media_module, "TRUSTED_FOR_TESTS", set())  # the real default policy


@pytest.fixture
def servers():
    """A good media host on 127.0.0.2 and traps on 127.0.0.1 and 127.0.0.3, all on one port."""
    port = free_port_on("127.0.0.1", "127.0.0.2", "127.0.0.3")
    made = {h: RecordingServer(h, port) for h in ("127.0.0.1", "127.0.0.2", "127.0.0.3")}
    for s in made.values():
        s.routes["/a.png"] = lambda req: send(req, 200, PNG, {"Content-Type": "image/png"})
        s.routes[UPLOAD] = s.routes["/a.png"]  # where Label Studio serves an upload
    yield made
    for s in made.values():
        s.close()


def _png(req):
    send(req, 200, PNG, {"Content-Type": "image/png"})


# --- 2. the default policy -----------------------------------------------------------------------

REFUSED = {
    "127.0.0.2": "loopback",
    "[::1]": "loopback",
    "10.1.2.3": "private",
    "172.16.0.9": "private",
    "192.168.1.1": "private",
    "100.64.0.1": "shared",
    "169.254.1.1": "link-local",
    "[fe80::1]": "link-local",
    "[fd12:3456::1]": "unique-local",
    "224.0.0.251": "multicast",
    "[ff02::1]": "multicast",
    "240.0.0.1": "reserved",
    "0.0.0.0": "unspecified",
    "[::]": "unspecified",
    "[::ffff:10.0.0.1]": "embedded",
    "[::ffff:127.0.0.1]": "embedded",
    "[::127.0.0.1]": "embedded",  # IPv4-compatible
    "[64:ff9b::a9fe:a9fe]": "metadata",  # NAT64 of 169.254.169.254
    "[64:ff9b::c0a8:101]": "embedded",  # NAT64 of 192.168.1.1
    "[2002:a00:1::]": "embedded",  # 6to4 of 10.0.0.1
    "169.254.169.254": "metadata",
    "168.63.129.16": "metadata",  # Azure's WireServer is a public address
    "100.100.100.200": "metadata",
    "[fd00:ec2::254]": "metadata",
}


@pytest.mark.parametrize("host, rule", REFUSED.items())
def test_default_policy_refuses_non_public_addresses_naming_the_rule(host, rule):
    media = MediaClient(LabelStudioAuth(None, None), MediaLimits(timeout_s=1))
    with pytest.raises(MediaError) as e:
        media.fetch(f"http://{host}:8080/a.png")
    assert http_status(e.value) == 403 and rule in e.value.message


def test_a_name_is_refused_if_any_of_its_addresses_is(servers):
    answers = {"cdn.example": ["93.184.216.34", "127.0.0.2"]}
    limits = MediaLimits(resolver=lambda host, port: answers[host])
    with pytest.raises(MediaError, match="127.0.0.2 is a loopback address"):
        MediaClient(LabelStudioAuth(None, None), limits).fetch(
            servers["127.0.0.2"].url("/a.png", host="cdn.example")
        )
    assert all(s.connections == 0 for s in servers.values())


def test_public_names_pass_and_listed_hosts_are_the_only_exception(servers):
    media = MediaClient(LabelStudioAuth(None, None), MediaLimits(allowed_hosts=("127.0.0.2",)))
    assert media.fetch(servers["127.0.0.2"].url("/a.png")) == PNG  # listed: its loopback address is fine
    with pytest.raises(MediaError, match="not in MEDIA_ALLOWED_HOSTS"):
        media.fetch(servers["127.0.0.3"].url("/a.png"))
    assert servers["127.0.0.3"].connections == 0
    # a listed name that resolves to a metadata address is still refused
    limits = MediaLimits(allowed_hosts=("meta.example",), resolver=lambda h, p: ["169.254.169.254"])
    with pytest.raises(MediaError, match="metadata"):
        MediaClient(LabelStudioAuth(None, None), limits).fetch("http://meta.example/x")


def test_label_studio_host_is_exempt(servers):
    ls = servers["127.0.0.2"]
    media = MediaClient(LabelStudioAuth(ls.url(""), LEGACY))
    assert media.fetch(UPLOAD) == PNG
    assert media.fetch(ls.url(UPLOAD)) == PNG


def test_dns_answer_changing_after_the_check_gains_nothing(servers):
    """Rebinding: the first answer is checked and connected to; a second lookup never happens."""
    answers = iter([["127.0.0.2"], ["127.0.0.3"], ["127.0.0.3"]])
    calls = []

    def resolver(host, port):
        calls.append(host)
        return next(answers)

    limits = MediaLimits(allowed_hosts=("media.example",), resolver=resolver)
    media = MediaClient(LabelStudioAuth(None, None), limits)
    assert media.fetch(servers["127.0.0.2"].url("/a.png", host="media.example")) == PNG
    assert calls == ["media.example"]
    assert servers["127.0.0.3"].connections == 0
    seen = servers["127.0.0.2"].seen[-1]
    assert seen.headers["Host"] == f"media.example:{servers['127.0.0.2'].port}"


# --- 1. one parser: the checked host is the connected host ----------------------------------------

HOSTS = [
    "127.0.0.2",
    "127.0.0.3",
    "127.1",
    "0x7f.0.0.2",
    "2130706434",
    "0177.0.0.2",
    "127.000.000.002",
    "127.0.0.2.",
    "%31%32%37.0.0.2",
    "[::ffff:127.0.0.2]",
    "127.0.0.2\\@127.0.0.3",
    "127.0.0.3\\.127.0.0.2",
    "127.0.0.3#@127.0.0.2",
    "127.0.0.3?@127.0.0.2",
    "127.0.0.2@127.0.0.3",
    "127.0.0.3@127.0.0.2",
    "user:pw@127.0.0.2",
    "127。0。0。2",
    "localhost",
    "LOCALHOST",
    "127.0.0.2\t",
    " 127.0.0.2",
    "[127.0.0.2]",
]


@st.composite
def url_spellings(draw, port: int):
    scheme = draw(st.sampled_from(["http", "HTTP", "hTtP", "http:", "http:/", "http:\\\\"]))
    sep = draw(st.sampled_from(["://", ":/\\", ":\\\\", "://\\"]))
    host = draw(st.sampled_from(HOSTS))
    port_text = draw(
        st.sampled_from([f":{port}", f":0{port}", f":+{port}", f": {port}", f":{port}:{port}", ""])
    )
    path = draw(
        st.sampled_from(["/a.png", "\\a.png", "/a.png?x=@127.0.0.3", "/a.png#@127.0.0.3", "/%2e%2e/a.png"])
    )
    noise = draw(st.text(alphabet=string.printable + "\x00\x7f@\\%[]", max_size=3))
    where = draw(st.integers(0, 4))
    parts = [scheme, sep, host, port_text, path]
    parts[where] = parts[where] + noise
    return "".join(parts)


class RecordingClient(MediaClient):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.checked = []

    def check(self, target):
        target = super().check(target)
        self.checked.append(target)
        return target


def test_hypothesis_checked_host_is_connected_host(servers):
    port = servers["127.0.0.2"].port
    media = RecordingClient(
        LabelStudioAuth(None, None), MediaLimits(timeout_s=2, allowed_hosts=("127.0.0.2",))
    )

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(url_spellings(port))
    def check(url):
        media.checked.clear()
        before = {h: (s.connections, len(s.seen)) for h, s in servers.items()}
        try:
            media.fetch(url)
            fetched = True
        except MediaError:
            fetched = False
        reached = {h for h, s in servers.items() if (s.connections, len(s.seen)) != before[h]}
        if not media.checked:
            assert not reached, f"{url!r} was refused by the check but reached {reached}"
            assert not fetched
            return
        # everything that was connected to is what was checked, with the checked Host header
        assert reached <= {t.address for t in media.checked}, (url, reached, media.checked)
        assert all(t.host == "127.0.0.2" for t in media.checked), (url, media.checked)
        for h in reached:
            for seen in servers[h].seen[before[h][1] :]:
                assert seen.address == h
                assert seen.headers["Host"] in {t.host_header for t in media.checked}

    check()
    assert servers["127.0.0.3"].connections == 0 and servers["127.0.0.1"].connections == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.3\\@127.0.0.2:{port}/a.png",
        "http://127.0.0.2:{port}\\@127.0.0.3:{port}/a.png",
        "http://127.0.0.2:{port}@127.0.0.3:{port}/a.png",
        "http://127.0.0.3:{port}#@127.0.0.2:{port}/a.png",
        "http://127.0.0.3:{port}?@127.0.0.2:{port}/a.png",
        "http://%31%32%37.0.0.3:{port}/a.png",
        "http://127.0.0.3%2f@127.0.0.2:{port}/a.png",
        "http://127.0.0.3\t@127.0.0.2:{port}/a.png",
        "http://127.0.0.3\n@127.0.0.2:{port}/a.png",
    ],
)
def test_parser_confusion_never_sends_the_token_elsewhere(servers, url):
    """The reported attack: a URL one parser reads as Label Studio's host while the HTTP library
    connects to another host. Label Studio is 127.0.0.2 here; 127.0.0.3 must see nothing."""
    ls = servers["127.0.0.2"]
    media = MediaClient(LabelStudioAuth(ls.url(""), LEGACY))
    with contextlib.suppress(MediaError):
        media.fetch(url.format(port=ls.port))
    assert servers["127.0.0.3"].connections == 0
    assert all(s.headers.get("Authorization") is None for s in servers["127.0.0.1"].seen)


def test_https_connects_to_the_checked_address_with_the_name_as_sni_and_host(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("media.example")
    ctx = __import__("ssl").SSLContext(__import__("ssl").PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    server = RecordingServer("127.0.0.2", tls=ctx)
    server.routes["/a.png"] = _png
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        limits = MediaLimits(
            allowed_hosts=("media.example", "other.example"),
            resolver=lambda host, port: ["127.0.0.2"],
            ca_certs=str(ca_file),
            timeout_s=3,
        )
        media = MediaClient(LabelStudioAuth(None, None), limits)
        assert media.fetch(f"https://media.example:{server.port}/a.png") == PNG
        assert server.sni[-1] == "media.example"
        assert server.seen[-1].headers["Host"] == f"media.example:{server.port}"
        # the same address under a name the certificate does not cover: refused by TLS
        with pytest.raises(MediaError, match="cannot fetch"):
            media.fetch(f"https://other.example:{server.port}/a.png")
        assert len(server.seen) == 1
    finally:
        server.close()


# --- 3. the token goes only to Label Studio's origin --------------------------------------------


def test_token_and_cookies_stay_with_their_origin(servers):
    ls, other = servers["127.0.0.2"], servers["127.0.0.3"]
    ls_other_port = RecordingServer("127.0.0.2")  # Label Studio's host, another port: another origin
    ls_other_port.routes["/a.png"] = _png
    try:
        ls.routes["/data/upload/to-other-host"] = lambda req: send(
            req, 302, b"", {"Location": other.url("/a.png"), "Set-Cookie": "sessionid=ls-secret"}
        )
        ls.routes["/data/upload/to-other-port"] = lambda req: send(
            req, 302, b"", {"Location": ls_other_port.url("/a.png")}
        )
        other.routes["/back"] = lambda req: send(
            req, 302, b"", {"Location": ls.url(UPLOAD), "Set-Cookie": "x=other"}
        )
        limits = MediaLimits(allowed_hosts=("127.0.0.3",))
        media = MediaClient(LabelStudioAuth(ls.url(""), LEGACY), limits)
        assert media.fetch("/data/upload/to-other-host") == PNG
        # Label Studio's host on another port is another origin, and a loopback one: refused
        with pytest.raises(MediaError, match="refusing media host '127.0.0.2'"):
            media.fetch("/data/upload/to-other-port")
        assert ls_other_port.connections == 0
        assert media.fetch(other.url("/back")) == PNG
        assert media.fetch(UPLOAD) == PNG
        assert all("Authorization" not in s.headers and "Cookie" not in s.headers for s in other.seen)
        assert all("Authorization" not in s.headers for s in ls_other_port.seen)
        assert all("Cookie" not in s.headers for s in ls.seen)
        assert sum(s.headers.get("Authorization") == f"Token {LEGACY}" for s in ls.seen) == 4
    finally:
        ls_other_port.close()


def test_label_studio_is_trusted_on_its_own_port_only_and_refused_ports_look_alike(servers):
    """The exact origin (scheme, host, port) is Label Studio's, not its host on every port: a task
    URL naming another port of its (loopback) host is refused before any connection, with the
    same message whether something listens there or not."""
    ls = servers["127.0.0.2"]
    listening = RecordingServer("127.0.0.2")  # Label Studio's host, another port, something there
    listening.routes[UPLOAD] = _png
    closed = free_port_on("127.0.0.2")  # and a port where nothing listens
    try:
        media = MediaClient(LabelStudioAuth(ls.url(""), LEGACY))
        errors = []
        for port in (listening.port, closed):
            with pytest.raises(MediaError) as caught:
                media.fetch(f"http://127.0.0.2:{port}{UPLOAD}")
            errors.append((http_status(caught.value), caught.value.message))
        assert errors[0] == errors[1] and errors[0][0] == 403, errors
        assert "loopback" in errors[0][1] and str(listening.port) not in errors[0][1]
        assert listening.connections == 0
        assert media.fetch(ls.url(UPLOAD)) == PNG  # its own port still is
    finally:
        listening.close()


@pytest.mark.parametrize(
    "path",
    [
        "/api/projects/1/export",
        "/api/tasks/1/",
        "/user/login/",
        "/data/upload/../../api/projects/1/export",
        "/data/upload/%2e%2e/%2e%2e/api/projects/1/export",
        "/data/upload/1/..%2f..%2f..%2fapi/projects/1/export",
        "/tasks/1/presign/../../api/projects/1/export",
    ],
)
def test_label_studio_is_asked_for_media_paths_only(servers, path):
    """The token goes to Label Studio's media paths, never to its API: a task URL naming any other
    path of Label Studio is refused before connecting, with one message whatever the path would
    have answered (an export, a 404)."""
    ls = servers["127.0.0.2"]
    ls.routes["/api/projects/1/export"] = lambda req: send(req, 200, b'[{"secret": 1}]')
    media = MediaClient(LabelStudioAuth(ls.url(""), LEGACY))
    for url in (path, ls.url(path)):
        with pytest.raises(MediaError, match="only its media paths") as caught:
            media.fetch(url)
        assert http_status(caught.value) == 403 and "HTTP" not in caught.value.message
    assert ls.seen == []


def test_label_studio_media_paths_get_the_token(servers):
    ls = servers["127.0.0.2"]
    for path in ("/data/local-files/", "/tasks/7/resolve/", "/tasks/7/presign/", "/storage-data/uploaded/"):
        ls.routes[path] = _png
    media = MediaClient(LabelStudioAuth(ls.url("/"), LEGACY))
    for url in (
        UPLOAD,
        "/data/local-files/?d=images/a.png",
        "/tasks/7/resolve/?fileuri=czM6Ly9iL2EucG5n",
        "/storage-data/uploaded/?filepath=a.png",
    ):
        assert media.fetch(url) == PNG, url
    assert media.fetch("s3://bucket/a.png", task_id=7) == PNG  # presigned through /tasks/7/presign/
    assert [s.headers.get("Authorization") for s in ls.seen] == [f"Token {LEGACY}"] * 5


def test_label_studio_under_a_path_prefix_gets_media_paths_below_it(servers):
    ls = servers["127.0.0.2"]
    ls.routes["/ls" + UPLOAD] = _png
    media = MediaClient(LabelStudioAuth(ls.url("/ls"), LEGACY))
    assert media.fetch(UPLOAD) == PNG
    with pytest.raises(MediaError, match="only its media paths"):
        media.fetch(ls.url(UPLOAD))  # outside LABEL_STUDIO_URL's path


def test_token_exchange_never_follows_a_redirect(servers):
    ls, other = servers["127.0.0.2"], servers["127.0.0.3"]
    ls.routes["/api/token/refresh/"] = lambda req: send(
        req, 307, b"", {"Location": other.url("/api/token/refresh/")}
    )
    pat = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln"
    media = MediaClient(LabelStudioAuth(ls.url(""), pat), MediaLimits(allowed_hosts=("127.0.0.3",)))
    with pytest.raises(MediaError, match="redirect"):
        media.fetch(UPLOAD)
    assert other.connections == 0


def test_bulk_api_client_never_follows_label_studio_elsewhere(servers):
    from label_studio_sam2.labelstudio.api import LabelStudioAPI, Retry

    ls, other = servers["127.0.0.2"], servers["127.0.0.3"]
    ls.routes["/api/tasks/1/"] = lambda req: send(req, 302, b"", {"Location": other.url("/api/tasks/1/")})
    api = LabelStudioAPI(ls.url(""), LEGACY, Retry(sleep=lambda s: None))
    with pytest.raises(Exception):  # noqa: B017 (what matters is where the token went)
        api.task(1)
    assert ls.seen and ls.seen[-1].headers.get("Authorization") == f"Token {LEGACY}"
    assert other.connections == 0


def test_credentials_in_label_studio_url_never_show(servers, caplog):
    ls = servers["127.0.0.2"]
    auth = LabelStudioAuth(f"http://admin:hunter2pw@127.0.0.2:{ls.port}", LEGACY)
    media = MediaClient(auth)
    with pytest.raises(MediaError) as e:
        media.fetch("/missing.png")
    assert "hunter2pw" not in e.value.message and "hunter2pw" not in repr(auth)
    assert "admin" not in e.value.message
    assert "hunter2pw" not in caplog.text
    assert all("hunter2pw" not in str(s.headers) for s in ls.seen)


# --- 4. time limits from connect to the last byte ------------------------------------------------

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(PNG) + PNG


@pytest.mark.parametrize("what", ["status line", "headers", "body", "redirects"])
def test_trickling_server_is_cut_off_by_the_download_deadline(servers, what):
    s = servers["127.0.0.2"]
    if what == "redirects":
        s.routes["/slow"] = lambda req: (time.sleep(0.5), send(req, 302, b"", {"Location": "/slow"}))
    else:
        start = {"status line": 0, "headers": 17, "body": len(RESPONSE) - len(PNG)}[what]
        s.routes["/slow"] = lambda req: (
            req.wfile.write(RESPONSE[:start]),
            trickle(req, RESPONSE[start:], 0.25),
        )
    media = MediaClient(
        LabelStudioAuth(None, None), MediaLimits(timeout_s=1, deadline_s=1.5, allowed_hosts=("127.0.0.2",))
    )
    t0 = time.monotonic()
    with pytest.raises(MediaError) as e:
        media.fetch(s.url("/slow"))
    elapsed = time.monotonic() - t0
    assert http_status(e.value) == 504 and elapsed < 3.0, (e.value.message, elapsed)


def test_request_deadline_bounds_every_download(servers):
    s = servers["127.0.0.2"]
    s.routes["/slow"] = lambda req: trickle(req, RESPONSE, 0.25)
    media = MediaClient(
        LabelStudioAuth(None, None), MediaLimits(timeout_s=5, deadline_s=60, allowed_hosts=("127.0.0.2",))
    )
    t0 = time.monotonic()
    with request_deadline(time.monotonic() + 1.0), pytest.raises(MediaError, match="took longer"):
        media.fetch(s.url("/slow"))
    assert time.monotonic() - t0 < 2.5


# --- 6. malformed URLs are per-task errors -------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com:99999/a.png",
        "http://example.com:-1/a.png",
        "http://example.com:0/a.png",
        "http://example.com:8o/a.png",
        "http://[::1/a.png",
        "http://::1]/a.png",
        "http://[::1]]/a.png",
        "http://[fe80::1%25eth0]/a.png",
        "http://" + "a" * 64 + ".example.com/a.png",
        "http://" + ".".join(["abcdefgh"] * 40) + "/a.png",
        "http://exa mple.com/a.png",
        "http://example..com/a.png",
        "http:///a.png",
        "http://bücher.example/a.png",
        "javascript:alert(1)",
        "file:///etc/passwd",
    ],
)
def test_malformed_urls_are_media_errors(url):
    media = MediaClient(LabelStudioAuth(None, None), MediaLimits(timeout_s=1))
    with pytest.raises(MediaError) as e:
        media.fetch(url)
    assert 400 <= http_status(e.value) < 500


def test_refusals_never_repeat_credentials_from_the_url():
    media = MediaClient(LabelStudioAuth(None, None))
    for url in ("http://admin:pa55word@example.com/a.png", "http://x\\admin:pa55word@example.com/"):
        with pytest.raises(MediaError) as e:
            media.fetch(url)
        assert "pa55word" not in e.value.message


@pytest.mark.parametrize(
    "location",
    ["http://[::1", "http://127.0.0.2:99999/", "\\\\127.0.0.3\\a.png", "http://a b/", "http://\x00/"],
)
def test_malformed_redirect_location_is_a_media_error(servers, location):
    s = servers["127.0.0.2"]
    s.routes["/r"] = lambda req: (
        req.send_response(302),
        req.wfile.write(b"Location: " + location.encode("latin-1") + b"\r\nContent-Length: 0\r\n\r\n"),
    )
    media = MediaClient(LabelStudioAuth(None, None), MediaLimits(timeout_s=2, allowed_hosts=("127.0.0.2",)))
    with pytest.raises(MediaError):
        media.fetch(s.url("/r"))
    assert servers["127.0.0.3"].connections == 0


def test_spaces_and_non_ascii_in_the_path_are_encoded(servers):
    s = servers["127.0.0.2"]
    s.routes["/my%20photo%20%C3%A9.png"] = _png
    media = MediaClient(LabelStudioAuth(None, None), MediaLimits(allowed_hosts=("127.0.0.2",)))
    assert media.fetch(s.url("/my photo \u00e9.png")) == PNG
    assert s.seen[-1].path == "/my%20photo%20%C3%A9.png"


def test_parse_target_keeps_what_the_connection_uses():
    t = parse_target("https://Media.Example:8443/a/b.png?sig=secret#frag")
    assert (t.scheme, t.host, t.port, t.request_uri) == (
        "https",
        "media.example",
        8443,
        "/a/b.png?sig=secret",
    )
    assert t.host_header == "media.example:8443" and "secret" not in str(t)
    assert parse_target("http://[2001:db8::1]/x").host_header == "[2001:db8::1]"
