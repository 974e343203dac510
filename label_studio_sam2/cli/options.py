"""What several commands share: `--model`/`--device`/`--encoder-runtime`, `--url`/`--api-key`,
and the Ctrl-C handling of long jobs (`stop_on_signals`)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

MODEL_HELP = (
    "short name (sam2.1-tiny), hub id, HF directory, Meta .pt, or `test` (the tiny model "
    "`make run MODEL=test` serves); pass the model the server serves "
    "(default: SAM2_MODEL, else facebook/sam2.1-hiera-tiny, as `serve`)"
)
DEVICE_HELP = "auto | cpu | cuda | mps (default: DEVICE, else auto)"


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --device and --encoder-runtime, as every command that loads SAM2 takes them
    (`model_settings` turns them into Settings overrides)."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument(
        "--encoder-runtime",
        choices=["auto", "torch", "openvino"],
        default=None,
        help="what runs the image encoder on CPU: auto (OpenVINO, PyTorch where it cannot load), "
        "torch, openvino (default: ENCODER_RUNTIME, else auto)",
    )


def model_settings(args: argparse.Namespace) -> dict:
    """The Settings overrides `add_model_options`' flags give (None: the environment decides)."""
    return dict(model=args.model, device=args.device, encoder_runtime=args.encoder_runtime)


def add_label_studio_options(p: argparse.ArgumentParser) -> None:
    """--url and --api-key, as every command that talks to Label Studio takes them."""
    p.add_argument("--url", default=None, help="Label Studio URL (default: LABEL_STUDIO_URL)")
    p.add_argument(
        "--api-key",
        default=None,
        help="Label Studio token (default: LABEL_STUDIO_API_KEY; prefer it: a key on the command line "
        "is visible to other users)",
    )


def stop_on_signals(what: str):
    """A threading.Event set by the first Ctrl-C (or SIGTERM): long jobs finish `what` and stop
    cleanly; a second Ctrl-C aborts at once."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        logging.getLogger("label_studio_sam2").warning(
            "stopping after the current %s (Ctrl-C again to abort at once)", what
        )

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop
