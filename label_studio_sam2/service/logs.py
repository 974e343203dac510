"""Logging set-up for every entry point (server, gunicorn workers, CLIs): one format, and no
configured secret ever reaches a log line."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit


class _SecretFilter(logging.Filter):
    """Last line of defence: never let a configured secret reach a log line."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            if any(s in msg for s in self.secrets):
                for s in self.secrets:
                    msg = msg.replace(s, "***")
                record.msg, record.args = msg, ()
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    secrets = [
        os.environ.get(k, "")
        for k in ("LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS", "LABEL_STUDIO_ACCESS_TOKEN")
    ]
    handler.addFilter(_SecretFilter([*secrets, url_password(os.environ.get("REDIS_URL", ""))]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # werkzeug logs request lines only (never headers); urllib3 at DEBUG would log URLs with tokens
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))


def url_password(url: str) -> str:
    """The password in a URL such as REDIS_URL (`redis://:password@host`), or ""."""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""
