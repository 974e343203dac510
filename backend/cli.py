"""`python -m backend serve|make-test-model|convert|preannotate|warm`.

Every subcommand is registered here, in `COMMANDS`: a function that adds its parser (and sets
`fn`, the function that runs it). Commands that live with their code (bulk pre-annotation,
pre-encoding) export such a function.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from werkzeug.serving import run_simple

from backend import warm
from backend.app import create_app
from backend.logs import setup_logging
from backend.preannotate import cli as preannotate_cli
from backend.settings import Settings, SettingsError
from sam2.convert import convert_checkpoint
from sam2.models import set_cpu_threads, write_test_model

# The tiny SAM2 trained on synthetic shapes: part of the source checkout's development kit, not of
# the Docker image (which holds only backend/ and sam2/).
FIXTURE = Path(__file__).resolve().parent.parent / "devkit" / "sam2-shapes"


def cmd_serve(args) -> None:
    settings = Settings.from_env(model=args.model, device=args.device, host=args.host, port=args.port)
    setup_logging(settings.log_level)
    set_cpu_threads(args.threads)
    app = create_app(settings)
    logging.getLogger("backend").info(
        "serving on http://%s:%d (model %s)", settings.host, settings.port, settings.model
    )
    run_simple(settings.host, settings.port, app, threaded=True, use_reloader=False)


def cmd_make_test_model(args) -> None:
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
    out = convert_checkpoint(Path(args.checkpoint), Path(args.dir), config=args.config)
    print(f"converted {args.checkpoint} -> {out}")


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve the ML backend protocol (development server; gunicorn for teams)")
    s.add_argument("--host", default=None, help="address to listen on (HOST, 0.0.0.0)")
    s.add_argument("--port", type=int, default=None, help="port (PORT, 9090)")
    s.add_argument(
        "--model",
        default=None,
        help="short name (sam2.1-tiny), hub id, HF directory or Meta .pt (SAM2_MODEL)",
    )
    s.add_argument("--device", default=None, help="auto | cpu | cuda | mps (DEVICE)")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.set_defaults(fn=cmd_serve)


def add_make_test_model(sub) -> None:
    m = sub.add_parser("make-test-model", help="write a tiny SAM2 for smoke tests (no download)")
    m.add_argument("dir")
    m.add_argument(
        "--trained",
        action="store_true",
        help="the small model trained on synthetic shapes (devkit/sam2-shapes; a source checkout only)",
    )
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--image-size", type=int, default=256)
    m.set_defaults(fn=cmd_make_test_model)


def add_convert(sub) -> None:
    c = sub.add_parser("convert", help="convert a Meta SAM2 .pt checkpoint to a Hugging Face directory")
    c.add_argument("checkpoint")
    c.add_argument("dir")
    c.add_argument(
        "--config", default=None, help="size (tiny/small/base-plus/large); guessed from the file name"
    )
    c.set_defaults(fn=cmd_convert)


COMMANDS = (add_serve, add_make_test_model, add_convert, preannotate_cli.add_parser, warm.add_parser)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m backend", description="Label Studio ML backend for SAM2")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in COMMANDS:
        add(sub)
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except SettingsError as e:  # a bad environment variable: say which, no traceback
        sys.exit(f"python -m backend {args.cmd}: {e}")
