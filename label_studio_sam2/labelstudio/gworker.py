"""The gunicorn worker class of deploy/gunicorn.conf.py: gthread, with request headers read by the
worker's event loop instead of a thread.

gunicorn's gthread worker hands a connection to a thread as soon as its first byte arrives; the
thread then blocks reading the rest of the headers. A few clients sending headers one byte at a
time (no credentials needed) hold every thread, and /health and the labelers' clicks wait behind
them. Here the event loop collects a request's headers without blocking (like nginx does in front
of a server) and commits a thread only once they are complete. A client that has not sent its
headers within HEADER_TIMEOUT_S is disconnected. Bodies are read by the thread as before (the app
refuses unauthenticated requests before reading them).

Imported by the gunicorn master (worker_class): imports nothing but gunicorn and label_studio_sam2.service.settings
(no torch).
"""

from __future__ import annotations

import collections
import errno
import selectors
import time
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker

from label_studio_sam2.service.settings import Settings

HEADER_END = b"\r\n\r\n"


def header_timeout_s() -> float:
    return Settings.from_env().header_timeout_s


class HeaderTimeoutWorker(ThreadWorker):
    """gthread with headers read in the event loop, bounded by HEADER_TIMEOUT_S and by gunicorn's
    header size limits (limit_request_line + limit_request_fields x limit_request_field_size)."""

    def init_process(self):
        self.reading_headers: collections.deque[TConn] = collections.deque()  # oldest first
        self.header_timeout_s = header_timeout_s()
        self.max_header_bytes = (
            self.cfg.limit_request_line + self.cfg.limit_request_fields * self.cfg.limit_request_field_size
        ) or 1 << 20
        super().init_process()

    def accept(self, listener):
        if self.cfg.is_ssl:  # TLS needs its handshake in a thread; terminate TLS in a proxy instead
            return super().accept(listener)
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())  # non-blocking
        self._read_headers(conn)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection sends its next request: read its headers here too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_headers(conn)

    def _read_headers(self, conn: TConn) -> None:
        conn.sock.setblocking(False)
        conn.header_bytes = bytearray()
        conn.header_deadline = time.monotonic() + self.header_timeout_s
        self.reading_headers.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_header_bytes, conn))

    def _on_header_bytes(self, conn: TConn, sock) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._stop_reading(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.header_bytes += data
        if HEADER_END in conn.header_bytes or len(conn.header_bytes) > self.max_header_bytes:
            # complete (or too long: the parser answers 400/431): now a thread may take it
            self._stop_reading(conn)
            conn.data_ready = True
            self.enqueue_req(conn)

    def _stop_reading(self, conn: TConn) -> None:
        self.poller.unregister(conn.sock)
        self.reading_headers.remove(conn)

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        while self.reading_headers and self.reading_headers[0].header_deadline <= now:
            conn = self.reading_headers[0]
            self._stop_reading(conn)
            self.nr_conns -= 1
            conn.close()

    def handle(self, conn):
        buffered = getattr(conn, "header_bytes", None)
        if buffered is not None:
            conn.header_bytes = None
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(bytes(buffered))
        return super().handle(conn)
