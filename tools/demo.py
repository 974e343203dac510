"""`make run`: Label Studio and the SAM2 backend on this machine, with a demo project, until Ctrl-C.

    python tools/demo.py [--model M] [--test-model] [--port 8080] [--backend-port 9090]

Label Studio runs from .venv-ls (installed on first use) with SQLite under .run/label-studio/,
kept between runs; the backend runs from this virtualenv. The model is --model, else SAM2_MODEL,
else SAM2.1 tiny, loaded offline first; when its weights cannot be had the demo says how to
provide them and stops. --test-model uses the tiny SAM2 trained on synthetic shapes (tests/fixtures/sam2-shapes): no
weights needed; it segments simple flat-coloured shapes like the demo's, nothing else.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.e2e import lsserver  # noqa: E402
from tests.e2e.sample_media import make_scene  # noqa: E402

RUN_DIR = REPO_ROOT / ".run"
PROJECT_TITLE = "SAM2 demo"
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="object" background="#ff4d4f"/>
    <Label value="background" background="#1890ff"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="object" background="#ff4d4f" showInline="true"/>
    <Label value="background" background="#1890ff" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="object" background="#ff4d4f" showInline="true"/>
    <Label value="background" background="#1890ff" showInline="true"/>
  </RectangleLabels>
</View>"""
SAMPLE_COUNT = 4


def say(message: str = "") -> None:
    print(message, flush=True)


def sample_images(directory: Path) -> list[Path]:
    """A few synthetic scenes (an ellipse and a square on a gradient), generated once."""
    paths = []
    for i in range(SAMPLE_COUNT):
        path = directory / f"sample-{i + 1}.png"
        if not path.exists():
            make_scene(path, 640, 480, seed=100 + i)
        paths.append(path)
    return paths


def demo_project(ls: lsserver.LabelStudio, backend_url: str, samples: list[Path]):
    """The demo project (created with the samples on the first run) connected to the backend."""
    client = ls.client
    project = next((p for p in client.projects.list() if p.title == PROJECT_TITLE), None)
    if project is None:
        project = lsserver.create_project(ls, PROJECT_TITLE, LABEL_CONFIG)
        for path in samples:
            ls.upload(project.id, path, "image/png")
    connected = [m for m in client.ml.list(project=project.id) if m.url.rstrip("/") == backend_url]
    if not connected:
        lsserver.connect_backend(ls, project.id, backend_url)
    return project


VIDEO_PROJECT_TITLE = "SAM2 video demo"
VIDEO_CONFIG = """<View>
  <Labels name="videoLabels" toName="video">
    <Label value="ellipse" background="#ff4d4f"/>
    <Label value="square" background="#1890ff"/>
  </Labels>
  <Video name="video" value="$video" framerate="25"/>
  <VideoRectangle name="box" toName="video" smart="true"/>
</View>"""


def video_demo(ls: lsserver.LabelStudio, backend_url: str, directory: Path) -> None:
    """A small video project (an ellipse and a square crossing paths, 48 frames), made on the
    first run and connected to the backend; prints where it is and the gesture that tracks."""
    from tests.videos import crossing_clip, write_video

    client = ls.client
    project = next((p for p in client.projects.list() if p.title == VIDEO_PROJECT_TITLE), None)
    if project is None:
        path = directory / "crossing.mp4"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            write_video(path, crossing_clip(0, num_frames=48, hw=(240, 320)).frames, fps=25)
        project = lsserver.create_project(ls, VIDEO_PROJECT_TITLE, VIDEO_CONFIG)
        ls.upload(project.id, path, "video/mp4")
    if not [m for m in client.ml.list(project=project.id) if m.url.rstrip("/") == backend_url]:
        lsserver.connect_backend(ls, project.id, backend_url)
    say(f"  Video demo     {ls.url}/projects/{project.id}/data")
    say("    Track an object: Auto-Annotation on, NO label selected, draw a box around it, click the")
    say("    box to select it, then pick its label: the tracked keyframes fill the timeline. To")
    say('    re-track after edits: "Delete predictions", then "Retrieve predictions" in the Data Manager.')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="short name, hub id, HF directory, Meta .pt, or 'test' (SAM2_MODEL)"
    )
    p.add_argument(
        "--test-model",
        action="store_true",
        help="the tiny SAM2 trained on synthetic shapes: no weights needed, segments simple shapes only",
    )
    p.add_argument("--device", default=None, help="auto | cpu | cuda (DEVICE)")
    p.add_argument(
        "--port", type=int, default=int(os.environ.get("LS_PORT", "8080")), help="Label Studio port"
    )
    p.add_argument("--backend-port", type=int, default=int(os.environ.get("BACKEND_PORT", "9090")))
    p.add_argument("--data-dir", type=Path, default=RUN_DIR / "label-studio", help="Label Studio's data")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = "127.0.0.1"
    RUN_DIR.mkdir(exist_ok=True)
    for name, port in (("Label Studio", args.port), ("the backend", args.backend_port)):
        if lsserver.port_in_use(host, port):
            say(f"Port {port} for {name} is in use. Choose another: make run LS_PORT=... BACKEND_PORT=...")
            return 2

    # Ctrl-C reaches only this process (the servers run in their own sessions): stop both here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    backend = ls = None
    try:
        model = args.model or os.environ.get("SAM2_MODEL") or "sam2.1-tiny"
        if args.test_model or model == "test":
            model = str(lsserver.make_test_model(RUN_DIR / "test-model", trained=True))
        lsserver.install()
        creds = lsserver.prepare_data_dir(args.data_dir.resolve())
        ls_url = f"http://{host}:{args.port}"

        say(f"Starting the SAM2 backend on http://{host}:{args.backend_port} with model {model} ...")
        backend = lsserver.start_backend(
            model,
            None,
            port=args.backend_port,
            device=args.device,
            log_path=RUN_DIR / "backend.log",
            extra_env={"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": creds.token},
        )
        health = backend.wait_for_model()
        if not health.get("model_loaded"):
            say("\nThe SAM2 weights could not be loaded, so nothing was started:\n")
            say(f"  {health.get('error') or 'the model did not load in time'}\n")
            say("Provide them offline with one of:")
            say("  make run MODEL=/path/to/sam2.1-hiera-tiny        (a directory saved by save_pretrained)")
            say("  make run MODEL=/path/to/sam2.1_hiera_tiny.pt     (Meta's checkpoint, converted once)")
            say("  HF_HOME=/path/to/hf-cache make run               (a Hugging Face cache holding the model)")
            say("or try it without weights: make run MODEL=test   (a tiny SAM2 trained on simple shapes)")
            return 3
        say(f"  model {health.get('model_version')} loaded")

        say(f"Starting Label Studio on {ls_url} (data in {args.data_dir}) ...")
        ls = lsserver.start_label_studio(args.data_dir, port=args.port, log_path=RUN_DIR / "label-studio.log")
        project = demo_project(ls, backend.url, sample_images(RUN_DIR / "samples"))

        say("")
        say(f"  Label Studio   {ls.url}/projects/{project.id}/data")
        say(f"  Login          {ls.username} / {ls.password}")
        say(f"  ML backend     {backend.url}  (model {health.get('model_version')})")
        say(f"  Logs           {RUN_DIR / 'label-studio.log'}, {RUN_DIR / 'backend.log'}")
        video_demo(ls, backend.url, RUN_DIR / "samples")
        say("")
        say("Open a task, switch on Auto-Annotation (bottom bar), pick the smart keypoint or rectangle")
        say('tool with the "object" label and click an object. Ctrl-C stops both servers.')
        while True:
            for name, proc in (("Label Studio", ls.process), ("The SAM2 backend", backend.process)):
                if proc.poll() is not None:
                    say(f"{name} stopped (exit code {proc.returncode}); see the logs in {RUN_DIR}.")
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        say("\nStopping ...")
        return 0
    except lsserver.LabelStudioError as e:
        say(f"\n{e}")
        return 1
    finally:
        for server in (backend, ls):
            if server is not None:
                server.stop()
        say("Label Studio and the backend are stopped.")


if __name__ == "__main__":
    sys.exit(main())
