"""Command-line options several commands share (`--model`/`--device`, `--url`/`--api-key`)."""

from __future__ import annotations

import argparse

MODEL_HELP = (
    "short name (sam2.1-tiny), hub id, HF directory or Meta .pt "
    "(default: SAM2_MODEL, else facebook/sam2.1-hiera-tiny)"
)
DEVICE_HELP = "auto | cpu | cuda | mps (default: DEVICE, else auto)"


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model and --device, as every command that loads SAM2 takes them."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)


def add_label_studio_options(p: argparse.ArgumentParser) -> None:
    """--url and --api-key, as every command that talks to Label Studio takes them."""
    p.add_argument("--url", default=None, help="Label Studio URL (default: LABEL_STUDIO_URL)")
    p.add_argument(
        "--api-key",
        default=None,
        help="Label Studio token (default: LABEL_STUDIO_API_KEY; prefer it: a key on the command line "
        "is visible to other users)",
    )
