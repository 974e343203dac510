"""Rewrite the environment-variable table of docs/configuration.md from `label_studio_sam2.service.settings`
(between its `<!-- env-table:start -->` / `<!-- env-table:end -->` markers): `python tools/env_table.py`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from label_studio_sam2.service.settings import env_table  # noqa: E402

CONFIGURATION = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

if __name__ == "__main__":
    text = CONFIGURATION.read_text()
    new, count = re.subn(
        r"(<!-- env-table:start -->\n).*?(\n<!-- env-table:end -->)",
        lambda m: m.group(1) + env_table() + m.group(2),
        text,
        flags=re.S,
    )
    if count != 1:
        sys.exit("docs/configuration.md lost its env-table markers")
    CONFIGURATION.write_text(new)
