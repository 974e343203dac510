"""Real HTTP servers on loopback aliases (127.0.0.2, 127.0.0.3, ...) that record every connection
and request, for the security tests: which address a connection reached, with which Host header,
token and cookies. Linux routes all of 127.0.0.0/8 to loopback without setup."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Seen:
    address: str  # the local address the connection reached
    path: str
    headers: dict[str, str] = field(default_factory=dict)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingServer

    def do_GET(self):
        self.server.record(self, "GET")

    do_POST = do_GET

    def log_message(self, *args):
        pass


class RecordingServer(http.server.ThreadingHTTPServer):
    """Serves `routes` (path without query -> handler(req)) and records what reaches it.
    `connections` counts accepted TCP connections, even ones that never send a request."""

    daemon_threads = True

    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None):
        super().__init__((host, port), _Handler)
        self.host, self.port = host, self.server_address[1]
        self.routes: dict[str, Callable[[_Handler], None]] = {}
        self.seen: list[Seen] = []
        self.connections = 0
        self.sni: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def verify_request(self, request, client_address) -> bool:
        self.connections += 1
        return True

    def record(self, req: _Handler, method: str) -> None:
        path = req.path.split("?")[0]
        self.seen.append(Seen(req.connection.getsockname()[0], req.path, dict(req.headers)))
        route = self.routes.get(path)
        if route is None:
            send(req, 404, b"not found")
        else:
            route(req)

    def url(self, path: str = "/", scheme: str = "http", host: str | None = None) -> str:
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def send(req: _Handler, status: int, body: bytes = b"", headers: dict | None = None) -> None:
    req.send_response(status)
    for k, v in (headers or {}).items():
        req.send_header(k, v)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def trickle(req: _Handler, raw: bytes, every_s: float) -> None:
    """Write `raw` (status line, headers, body) one byte at a time."""
    try:
        for i in range(len(raw)):
            req.wfile.write(raw[i : i + 1])
            req.wfile.flush()
            time.sleep(every_s)
    except OSError:
        pass  # the client hung up: what the test wants
    req.close_connection = True


def free_port_on(*hosts: str) -> int:
    """A port free on every one of `hosts`."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for h in hosts[1:]:
                with socket.socket() as t:
                    t.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {hosts}")
