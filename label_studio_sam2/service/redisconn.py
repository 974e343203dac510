"""One way to reach Redis (`REDIS_URL`): short timeouts so that nothing waits on a Redis that is
down, and a description of the URL that never shows its password."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis

CONNECT_TIMEOUT_S = 1.0  # a Redis that does not answer within this is down for this call
SOCKET_TIMEOUT_S = 5.0  # one command; RQ's blocking reads set their own


def connect(url: str, *, socket_timeout_s: float | None = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A client for `url` (connections are made lazily, on the first command). Binary replies:
    callers decode what they store."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=socket_timeout_s,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def describe(url: str) -> str:
    """`redis://host:port/db` without user or password, for logs and errors."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "redis://(unparsable REDIS_URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"
