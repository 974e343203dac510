"""Logging set-up for every entry point (server, gunicorn workers, CLIs): one format, and no
configured secret ever reaches a log line."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from label_studio_sam2.service.settings import Settings


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


def setup_logging(settings: Settings, level: str | None = None) -> None:
    """One handler on the root logger, at `level` (default: LOG_LEVEL), that masks the secrets
    `settings` hold (the Label Studio token, the basic auth password, REDIS_URL's password)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    secrets = [
        settings.label_studio_api_key or "",
        settings.basic_auth_pass or "",
        url_password(settings.redis_url or ""),
    ]
    handler.addFilter(_SecretFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or settings.log_level).upper())
    # werkzeug logs request lines only (never headers); urllib3 at DEBUG would log URLs with tokens
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))


def url_password(url: str) -> str:
    """The password in a URL such as REDIS_URL (`redis://:password@host`), or ""."""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""
