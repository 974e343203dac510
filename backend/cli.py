"""`python -m backend serve|make-test-model|convert|preannotate|...`"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from backend.settings import SettingsError

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sam2-shapes"


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
    handler.addFilter(
        _SecretFilter(
            [
                os.environ.get(k, "")
                for k in ("LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS", "LABEL_STUDIO_ACCESS_TOKEN")
            ]
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # werkzeug logs request lines only (never headers); urllib3 at DEBUG would log URLs with tokens
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def exposure_warning(host: str, port: int, settings) -> str | None:
    """What to tell a user who serves beyond loopback without basic auth (None otherwise)."""
    if host in LOOPBACK or settings.basic_auth_user:
        return None
    return (
        f"listening on {host}, beyond this machine, without authentication: anyone who reaches port "
        f"{port} can use the model and, through it, the Label Studio media its token can read. Set "
        "BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same user and password in Label Studio's model "
        "connection), or listen on --host 127.0.0.1"
    )


def stop_on_signals(what: str):
    """A threading.Event set by the first Ctrl-C (or SIGTERM): long jobs finish `what` and stop
    cleanly; a second Ctrl-C aborts at once."""
    import signal
    import threading

    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        logging.getLogger("backend").warning(
            "stopping after the current %s (Ctrl-C again to abort at once)", what
        )

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def cmd_serve(args) -> None:
    from backend.app import create_app
    from backend.settings import Settings

    settings = Settings.from_env(model=args.model, device=args.device)
    setup_logging(settings.log_level)
    warning = exposure_warning(args.host, args.port, settings)
    if warning:
        logging.getLogger("backend").warning(warning)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app = create_app(settings)
    logging.getLogger("backend").info(
        "serving on http://%s:%d (model %s)", args.host, args.port, settings.model
    )
    from werkzeug.serving import run_simple

    run_simple(args.host, args.port, app, threaded=True, use_reloader=False)


def cmd_make_test_model(args) -> None:
    out = Path(args.dir)
    if args.trained:
        if not (FIXTURE / "config.json").is_file():
            sys.exit(f"the trained fixture is missing at {FIXTURE}")
        out.mkdir(parents=True, exist_ok=True)
        for f in FIXTURE.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    else:
        from sam2.models import write_test_model

        write_test_model(out, seed=args.seed, image_size=args.image_size)
    print(f"wrote a tiny {'trained' if args.trained else 'random'} SAM2 to {out} (use: --model {out})")


def cmd_convert(args) -> None:
    from sam2.convert import convert_checkpoint

    out = convert_checkpoint(Path(args.checkpoint), Path(args.dir), config=args.config)
    print(f"converted {args.checkpoint} -> {out}")


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m backend",
        description="Label Studio ML backend for SAM2: serve it, pre-annotate or pre-encode projects, "
        "prepare models. `python -m backend COMMAND --help` explains each command.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="serve the ML backend protocol (development server; gunicorn for teams)",
        description="Serve /health, /setup, /predict, /webhook and /metrics for Label Studio with the "
        "threaded development server (a team deployment runs gunicorn: see the README). Listens on "
        "127.0.0.1 unless --host says otherwise; beyond loopback, set BASIC_AUTH_USER and "
        "BASIC_AUTH_PASS. Media are fetched from LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY.",
    )
    s.add_argument(
        "--host",
        default=os.environ.get("HOST", "127.0.0.1"),
        help="address to listen on: 0.0.0.0 for every interface (default: HOST, else 127.0.0.1)",
    )
    s.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "9090")), help="(default: PORT, else 9090)"
    )
    add_model_options(s)
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.set_defaults(fn=cmd_serve)

    m = sub.add_parser(
        "make-test-model",
        help="write a tiny SAM2 for smoke tests (no download)",
        description="Write a tiny SAM2 in Hugging Face format, usable as --model DIR without any "
        "weights: random (structure only: its masks mean nothing), or with --trained the small "
        "model trained on synthetic shapes, which segments simple flat shapes.",
    )
    m.add_argument("dir", help="directory to write (created)")
    m.add_argument(
        "--trained",
        action="store_true",
        help="the small model trained on synthetic shapes (tests/fixtures/sam2-shapes) instead of a random one",
    )
    m.add_argument("--seed", type=int, default=0, help="random model: weight seed (default: 0)")
    m.add_argument(
        "--image-size", type=int, default=256, help="random model: input size in px (default: 256)"
    )
    m.set_defaults(fn=cmd_make_test_model)

    c = sub.add_parser(
        "convert",
        help="convert a Meta SAM2 .pt checkpoint to a Hugging Face directory",
        description="Convert a Meta SAM2 / SAM2.1 checkpoint (.pt, a release or a fine-tune of one) "
        "into a Hugging Face directory for --model DIR. The size is read from the weights.",
    )
    c.add_argument("checkpoint", help="the Meta .pt file")
    c.add_argument("dir", help="directory to write")
    c.add_argument(
        "--config",
        default=None,
        help="size: tiny | small | base-plus | large (default: read from the weights and the file name)",
    )
    c.set_defaults(fn=cmd_convert)

    import importlib

    for module in (
        "backend.preannotate",
        "backend.warm",
        "backend.train",
    ):  # commands that live with their code
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except SettingsError as e:
        sys.exit(f"label-studio-sam2: {e}")
