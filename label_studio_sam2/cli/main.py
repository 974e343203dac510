"""`label-studio-sam2 serve|make-test-model|convert|preannotate|warm|train|worker`.

`build_parser` adds serve, make-test-model and convert, then the parsers of `label_studio_sam2.cli.parsers`
(preannotate, warm, train, worker). No parser imports torch: the code of a command, and torch
with it, is imported only when the command runs, so every `--help`, and a command line with a
mistake in it, answers at once.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from label_studio_sam2.cli.options import add_model_options, model_settings
from label_studio_sam2.cli.parsers import ADD_PARSERS
from label_studio_sam2.service.logs import setup_logging
from label_studio_sam2.service.settings import TEST_MODEL_FIXTURE as FIXTURE
from label_studio_sam2.service.settings import Settings, SettingsError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def exposure_warning(host: str, port: int, settings) -> str | None:
    """What to tell a user who serves beyond loopback without basic auth (None otherwise)."""
    if host in LOOPBACK or settings.basic_auth_user:
        return None
    return (
        f"listening on {host}, beyond this machine, without authentication: anyone who reaches port "
        f"{port} can use the model and, through it, the Label Studio media its token can read. Set "
        "BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same user and password in Label Studio's model "
        "connection), or listen on --host 127.0.0.1. Until then /predict, /setup and /webhook answer "
        f"only requests addressed to a loopback name or one in ALLOWED_HOSTS "
        f"({', '.join(settings.allowed_hosts) or 'none set'}): others get 403"
    )


def serve_settings(args) -> Settings:
    """The settings `serve` runs with: the environment, its flags winning."""
    return Settings.from_env(**model_settings(args), host=args.host, port=args.port)


def listen_address(settings: Settings) -> tuple[str, int]:
    """Where `serve` listens: --host/HOST (else loopback only) and --port/PORT."""
    return settings.host or "127.0.0.1", settings.port


def cmd_serve(args) -> None:
    from werkzeug.serving import run_simple

    from label_studio_sam2.engine.models import set_cpu_threads
    from label_studio_sam2.labelstudio.app import create_app

    settings = serve_settings(args)
    setup_logging(settings)
    host, port = listen_address(settings)
    warning = exposure_warning(host, port, settings)
    if warning:
        logging.getLogger("label_studio_sam2").warning(warning)
    set_cpu_threads(args.threads)
    app = create_app(settings)
    logging.getLogger("label_studio_sam2").info(
        "serving on http://%s:%d (model %s)", host, port, settings.model
    )
    run_simple(host, port, app, threaded=True, use_reloader=False)


def cmd_make_test_model(args) -> None:
    from label_studio_sam2.engine.models import write_test_model

    out = Path(args.dir)
    if args.trained:
        if not (FIXTURE / "config.json").is_file():
            sys.exit(
                f"the trained test model is not here ({FIXTURE}): it ships with the source checkout's "
                "devkit/, not with the Docker image. Run this from a checkout, or mount a model "
                "directory and pass it to --model; `make-test-model DIR` without --trained writes a "
                "random tiny model anywhere"
            )
        out.mkdir(parents=True, exist_ok=True)
        for f in FIXTURE.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    else:
        write_test_model(out, seed=args.seed, image_size=args.image_size)
    print(f"wrote a tiny {'trained' if args.trained else 'random'} SAM2 to {out} (use: --model {out})")


def cmd_convert(args) -> None:
    from label_studio_sam2.engine.convert import convert_checkpoint

    out = convert_checkpoint(Path(args.checkpoint), Path(args.dir), config=args.config)
    print(f"converted {args.checkpoint} -> {out}")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (imports no command's code: see `label_studio_sam2.cli.parsers`)."""
    p = argparse.ArgumentParser(
        prog="label-studio-sam2",
        description="Label Studio ML backend for SAM2: serve it, pre-annotate or pre-encode projects, "
        "prepare models. `label-studio-sam2 COMMAND --help` explains each command.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="serve the ML backend protocol (development server; gunicorn for teams)",
        description="Serve /health, /setup, /predict, /webhook and /metrics for Label Studio with the "
        "threaded development server (a team deployment runs gunicorn: see docs/deployment.md). Listens on "
        "127.0.0.1 unless --host says otherwise; beyond loopback, set BASIC_AUTH_USER and "
        "BASIC_AUTH_PASS. Media are fetched from LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY.",
    )
    s.add_argument(
        "--host",
        default=None,
        help="address to listen on: 0.0.0.0 for every interface (default: HOST, else 127.0.0.1)",
    )
    s.add_argument("--port", type=int, default=None, help="(default: PORT, else 9090)")
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
        help="the small model trained on synthetic shapes (devkit/sam2-shapes; a source checkout only) instead of a random one",
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

    for add_parser in ADD_PARSERS:
        add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except SettingsError as e:
        sys.exit(f"label-studio-sam2: {e}")
