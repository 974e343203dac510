"""`make run`: Label Studio and the SAM2 backend on this machine, with a demo project, until Ctrl-C.

    python tools/demo.py [--model M] [--test-model] [--port 8080] [--backend-port 9090] [--run-dir .run]

Label Studio runs from .venv-ls (installed on first use) with SQLite under .run/label-studio/,
kept between runs; the backend runs from this virtualenv. The model is --model, else SAM2_MODEL,
else SAM2.1 tiny, loaded offline first; when its weights cannot be had the demo says how to
provide them and stops. --test-model uses the tiny SAM2 trained on synthetic shapes (devkit/sam2-shapes): no
weights needed; it segments simple flat-coloured shapes like the demo's, nothing else.

The demo owns its Label Studio admin login: when Label Studio refuses its API token (revoked in
Account & Settings), it issues a fresh one, at start and while running (checked every few
seconds), and restarts the backend with it.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from devkit import lsserver  # noqa: E402
from devkit.sample_media import make_scene, rectangle  # noqa: E402

RUN_DIR = REPO_ROOT / ".run"
LOCK_FILE = "demo.lock"  # in the run dir, held while a demo runs on it
PAGE_SIZE = 100
PROJECT_TITLE = "SAM2 demo"
# One visible row of labels, in two groups: each smart tool takes only its own control's labels
# (in Label Studio 1.23.2 a click or box with no label selected makes no region). smartOnly: the
# keypoint and rectangle exist only as the smart tools (no plain tool that never calls the model);
# smart="false" on the brush: no smart brush in the Auto-Detect fly-out (this backend does not
# take brush strokes as prompts), and its labels are hidden: picking them would switch to the
# plain brush. The masks still come back as the brush control's regions.
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image" smart="false" visible="false">
    <Label value="object" background="#ff4d4f"/>
    <Label value="background" background="#1890ff"/>
  </BrushLabels>
  <View style="display: flex; align-items: center; gap: 12px; flex-wrap: wrap">
    <Header value="Click:" size="5"/>
    <KeyPointLabels name="click" toName="image" smart="true" smartOnly="true">
      <Label value="object" background="#ff4d4f"/>
      <Label value="background" background="#1890ff"/>
    </KeyPointLabels>
    <Header value="Box:" size="5"/>
    <RectangleLabels name="box" toName="image" smart="true" smartOnly="true">
      <Label value="object" background="#ff4d4f"/>
      <Label value="background" background="#1890ff"/>
    </RectangleLabels>
  </View>
</View>"""
SAMPLE_COUNT = 4
RECTANGLES_SAMPLE = "sample-rectangles.png"  # the task with a submitted annotation of plain rectangles
TOKEN_CHECK_S = 5.0

# Where people get lost; shown in the project's instructions (the Instructions button of the
# labeling page), written against what Label Studio 1.23.2 shows. {rect_task}: the task's ID.
INSTRUCTIONS = """<h3>SAM2 demo: a mask from a click or a box</h3>
<ol>
<li>Open a task. Switch on <b>Auto-Annotation</b> in the bar at the bottom of the labeling page.</li>
<li><b>A click.</b> Click <b>Auto-Detect</b>, the last button of the tool bar at the right edge of
the image (or press <b>M</b>): it selects the smart keypoint. Click the label <b>object</b> after
<b>Click:</b> below the image (it turns solid red), then click the object: its mask appears as a
suggestion.</li>
<li><b>A box.</b> Hover over <b>Auto-Detect</b>: its fly-out opens to the left. Pick the smart
rectangle (the second icon), click the label <b>object</b> after <b>Box:</b>, then drag a box around
the object.</li>
<li>Accept the suggestion with the check mark in the bottom bar, or turn on
<i>Auto-Accept Suggestions</i> there.</li>
<li>More clicks refine the mask (Alt+click: a negative point). The label turns pale after each click:
click it once before the next click (clicking a label that is still solid deselects it), or turn on
<i>Keep label selected after creating a region</i> in the settings (the Settings button of the bottom
bar).</li>
<li>Submit to keep the mask.</li>
</ol>
<p><b>Retrieve predictions</b>: task <b>{rect_task}</b> (its ID in the Data Manager's ID column; the
task annotated by the admin, AD under "Annotated by") has a submitted annotation with plain rectangles. In the Data Manager tick it, open the tasks menu at the top left ("1 Task"),
choose Retrieve Predictions and confirm; open the task and pick the prediction's tab (sam2-...):
a mask for each rectangle.</p>"""


def say(message: str = "") -> None:
    print(message, flush=True)


def listed(list_page, **kwargs) -> list:
    """Every item of a Label Studio list, page by page, stopping at a short page. (The SDK's pager
    asks for the page after the last one, which Label Studio answers with a 404 and logs as a
    `NotFound: Invalid page.` traceback.)"""
    items, page = [], 1
    while True:
        batch = list_page(page=page, page_size=PAGE_SIZE, **kwargs).items or []
        items += batch
        if len(batch) < PAGE_SIZE:
            return items
        page += 1


def sample_images(directory: Path) -> list[Path]:
    """A few synthetic scenes (an ellipse and a square on a gradient), generated once."""
    paths = []
    for i in range(SAMPLE_COUNT):
        path = directory / f"sample-{i + 1}.png"
        if not path.exists():
            make_scene(path, 640, 480, seed=100 + i)
        paths.append(path)
    return paths


def plain_rectangles(scene) -> list[dict]:
    """A labeler's rectangles drawn with the plain tool around the scene's two shapes."""
    boxes = (("object", scene.object_box_px), ("background", scene.distractor_box_px))
    regions = [rectangle(scene, label, box) for label, box in boxes]
    for region in regions:
        del region["origin"]  # what Label Studio stores for a submitted annotation
    return regions


def add_rectangles_task(ls: lsserver.LabelStudio, project_id: int, directory: Path) -> dict:
    """Upload the rectangles sample and submit an annotation holding plain rectangles."""
    scene = make_scene(directory / RECTANGLES_SAMPLE, 640, 480, seed=200)
    task = ls.upload(project_id, scene.path, "image/png")
    ls.client.annotations.create(id=task["id"], result=plain_rectangles(scene))
    return task


def rectangles_task_id(ls: lsserver.LabelStudio, project_id: int) -> int | None:
    for task in listed(ls.client.tasks.list, project=project_id, include="id,data"):
        if str((task.data or {}).get("image", "")).endswith(RECTANGLES_SAMPLE):
            return task.id
    return None


def demo_project(ls: lsserver.LabelStudio, backend_url: str, samples: list[Path]):
    """The demo project (created with the samples on the first run) connected to the backend.

    Projects of earlier demo versions get this version's label config, instructions and the
    rectangles task too.
    """
    client = ls.client
    project = next((p for p in listed(client.projects.list) if p.title == PROJECT_TITLE), None)
    if project is None:
        project = lsserver.create_project(ls, PROJECT_TITLE, LABEL_CONFIG)
        for path in samples:
            ls.upload(project.id, path, "image/png")
    if project.label_config != LABEL_CONFIG:  # a project of an earlier demo version
        client.projects.update(id=project.id, label_config=LABEL_CONFIG)
    rect_task = rectangles_task_id(ls, project.id)
    if rect_task is None:
        rect_task = add_rectangles_task(ls, project.id, samples[0].parent)["id"]
    instructions = INSTRUCTIONS.format(rect_task=rect_task)
    if project.expert_instruction != instructions:
        client.projects.update(id=project.id, expert_instruction=instructions, show_instruction=False)
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
    from devkit.videos import crossing_clip, write_video

    client = ls.client
    project = next((p for p in listed(client.projects.list) if p.title == VIDEO_PROJECT_TITLE), None)
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


def renew_token(ls: lsserver.LabelStudio) -> bool:
    """Issue a fresh personal access token if Label Studio refuses the demo's (someone revoked it
    in Account & Settings); True if it did.

    The demo owns its admin login, so it makes the token the way its first run did (Label Studio's
    own models, in its virtualenv): the API allows one token per user, and a user who revoked ours
    to see a copyable one may hold the only other.
    """
    if lsserver.token_works(ls.url, ls.token):
        return False
    creds = lsserver.bootstrap(ls.data_dir)
    ls.use_token(creds.token)
    return True


def spare_port(host: str, taken: tuple[int, ...]) -> int:
    """A free port near the demo's, for a second backend run by hand."""
    port = max(taken) + 1
    while port in taken or lsserver.port_in_use(host, port):
        port += 1
    return port


def banner(ls, project, backend, model_version: str, model: str, run_dir: Path, rect_task: int | None):
    host = "127.0.0.1"
    port = spare_port(host, (int(ls.url.rsplit(":", 1)[1]), int(backend.url.rsplit(":", 1)[1])))
    creds = ls.data_dir / lsserver.CREDENTIALS_FILE
    say("")
    say(f"  Label Studio   {ls.url}/projects/{project.id}/data")
    say(f"  Login          {ls.username} / {ls.password}")
    say(f"  ML backend     {backend.url}  (model {model_version})")
    say(f'  API token      the demo admin\'s personal access token is in {creds} ("token")')
    say(f"  Logs           {run_dir / 'label-studio.log'}, {run_dir / 'backend.log'}")
    say("")
    say("How to get a mask:")
    say("  Open a task and switch on Auto-Annotation (bottom bar). A click: click Auto-Detect, the last")
    say("  button of the tool bar at the right edge of the image (or press M): the smart keypoint. Click")
    say('  the label "object" after "Click:" below the image, then the object. A box: hover over')
    say("  Auto-Detect, pick the smart rectangle (second icon) from the fly-out that opens to the left,")
    say('  click "object" after "Box:", drag a box. Accept the suggested mask with the check mark in the')
    say("  bottom bar (or turn on Auto-Accept Suggestions). More clicks refine it: the label turns pale")
    say("  after each click, click it once before the next (a solid one deselects), or turn on")
    say('  "Keep label selected after creating a region" (Settings button of the bottom bar).')
    if rect_task is not None:
        say(f"Retrieve predictions: task {rect_task} (the Data Manager's ID column; the one annotated by")
        say("  the admin) has a submitted annotation with plain rectangles. Tick it, open the tasks menu")
        say('  at the top left ("1 Task"): Retrieve Predictions, OK; open the task and pick the')
        say("  prediction's tab (sam2-...): a mask for each rectangle.")
    say("Backend only (your own backend against this Label Studio; connect it in a project under")
    say(f"  Settings -> Model -> Connect Model, with a Name and this URL: http://127.0.0.1:{port}):")
    say(
        f"  LABEL_STUDIO_URL={ls.url} LABEL_STUDIO_API_KEY=$(.venv/bin/python -c "
        f"\"import json; print(json.load(open('{creds}'))['token'])\") "
        f".venv/bin/python -m label_studio_sam2 serve --port {port} --model {model}"
    )
    say("The demo project's instructions (the Instructions button of the labeling page) repeat this.")


def lock_run_dir(run_dir: Path, ls_url: str):
    """Hold `run_dir`'s lock for as long as this process runs (the open file, to keep); None if
    another demo holds it. Two demos on one directory would share Label Studio's SQLite database
    and its projects, attach a second model to them, and write into the same logs."""
    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {ls_url}\n")
    handle.flush()
    return handle


def running_demo(run_dir: Path) -> str:
    """'(pid N, Label Studio at URL)' of the demo holding `run_dir`'s lock, as far as it says."""
    try:
        pid, url = (run_dir / LOCK_FILE).read_text().split()[:2]
    except (OSError, ValueError):
        return ""
    return f" (pid {pid}, Label Studio at {url})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=None,
        help="short name, hub id, HF directory, Meta .pt, or 'test' (default: SAM2_MODEL, else sam2.1-tiny)",
    )
    p.add_argument(
        "--test-model",
        action="store_true",
        help="the tiny SAM2 trained on synthetic shapes: no weights needed, segments simple shapes only",
    )
    p.add_argument("--device", default=None, help="auto | cpu | cuda | mps (default: DEVICE, else auto)")
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("LS_PORT", "8080")),
        help="Label Studio port (default: LS_PORT, else 8080)",
    )
    p.add_argument(
        "--backend-port",
        type=int,
        default=int(os.environ.get("BACKEND_PORT", "9090")),
        help="SAM2 backend port (default: BACKEND_PORT, else 9090)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=RUN_DIR,
        help="the demo's files: logs, sample images, the test model (default: .run)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="Label Studio's data, kept between runs (default: RUN_DIR/label-studio)",
    )
    args = p.parse_args(argv)
    args.run_dir = args.run_dir.resolve()
    args.data_dir = (args.data_dir or args.run_dir / "label-studio").resolve()
    return args


def model_load_error(backend) -> str:
    """Why the backend's model did not load, from its log (its /health tells anonymous callers only
    to look there, so it never shows a model path); the backend is stopped."""
    backend.stop()
    marker = "model not loaded: "
    for line in reversed(backend.log().splitlines()):
        if marker in line:
            return line.split(marker, 1)[1]
    return "the model did not load in time"


def first_sentence(error: str) -> str:
    """The cause of a model error without the backend's own advice (the demo gives its own)."""
    return error.split(". Provide them")[0].rstrip(".") + "."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = "127.0.0.1"
    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir, f"http://{host}:{args.port}")
    if lock is None:
        say(f"A demo is already running on {run_dir}{running_demo(run_dir)}: use that one, or stop it")
        say("with Ctrl-C in its terminal first. A second demo beside it needs its own directory and")
        say("ports: python tools/demo.py --run-dir OTHER_DIR --port 8081 --backend-port 9091")
        return 2
    for name, port in (("Label Studio", args.port), ("the backend", args.backend_port)):
        if lsserver.port_in_use(host, port):
            say(f"Port {port} for {name} is in use by another program (no demo runs on {run_dir}).")
            say("Stop that program, or choose free ports: make run LS_PORT=8081 BACKEND_PORT=9091")
            return 2

    # Ctrl-C reaches only this process (the servers run in their own sessions): stop both here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    servers: dict[str, object] = {}
    data_dir = args.data_dir
    try:
        model = args.model or os.environ.get("SAM2_MODEL") or "sam2.1-tiny"
        if args.test_model or model == "test":
            model = str(lsserver.make_test_model(run_dir / "test-model", trained=True))
        lsserver.install()
        creds = lsserver.prepare_data_dir(data_dir)
        ls_url = f"http://{host}:{args.port}"

        def start_backend(token: str) -> dict:
            servers["backend"] = lsserver.start_backend(
                model,
                None,
                port=args.backend_port,
                device=args.device,
                log_path=run_dir / "backend.log",
                extra_env={"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": token},
            )
            return servers["backend"].wait_for_model()

        say(f"Starting the SAM2 backend on http://{host}:{args.backend_port} with model {model} ...")
        health = start_backend(creds.token)
        if not health.get("model_loaded"):
            error = model_load_error(servers.pop("backend"))
            say("\nThe SAM2 weights could not be loaded, so the demo did not start:")
            say(f"  {first_sentence(error)}\n")
            say("Provide them offline with one of:")
            say("  make run MODEL=/path/to/sam2.1-hiera-tiny        (a directory saved by save_pretrained)")
            say("  make run MODEL=/path/to/sam2.1_hiera_tiny.pt     (Meta's checkpoint, converted once)")
            say("  HF_HOME=/path/to/hf-cache make run               (a Hugging Face cache holding the model)")
            say("or try it without weights: make run MODEL=test")
            say("  (a tiny SAM2 trained on simple shapes; for your own backend:")
            say("   python -m label_studio_sam2 make-test-model DIR --trained, then --model DIR)")
            return 3
        say(f"  model {health.get('model_version')} loaded")

        say(f"Starting Label Studio on {ls_url} (data in {args.data_dir}) ...")
        ls = servers["ls"] = lsserver.start_label_studio(
            data_dir, port=args.port, log_path=run_dir / "label-studio.log"
        )
        if renew_token(ls):
            say(
                "  Label Studio refused the demo's API token (revoked?): issued a new one; restarting the backend"
            )
            servers.pop("backend").stop()
            health = start_backend(ls.token)
        backend = servers["backend"]
        project = demo_project(ls, backend.url, sample_images(run_dir / "samples"))
        rect_task = rectangles_task_id(ls, project.id)
        banner(ls, project, backend, health.get("model_version"), model, run_dir, rect_task)
        video_demo(ls, backend.url, run_dir / "samples")
        say("Ctrl-C stops both servers.")
        last_check = time.monotonic()
        while True:
            for name, proc in (
                ("Label Studio", ls.process),
                ("The SAM2 backend", servers["backend"].process),
            ):
                if proc.poll() is not None:
                    say(f"{name} stopped (exit code {proc.returncode}); see the logs in {run_dir}.")
                    return 1
            if time.monotonic() - last_check >= TOKEN_CHECK_S:
                last_check = time.monotonic()
                try:
                    renewed = renew_token(ls)
                except requests.RequestException:
                    renewed = False  # Label Studio busy: check again next time
                if renewed:
                    say(
                        "The demo's API token was revoked in Label Studio: issued a new one (in the same file);"
                    )
                    say("restarting the backend with it ...")
                    servers.pop("backend").stop()
                    start_backend(ls.token)
                    say("  the backend is back.")
            time.sleep(1)
    except KeyboardInterrupt:
        say("\nStopping ...")
        return 0
    except lsserver.LabelStudioError as e:
        say(f"\n{e}")
        return 1
    finally:
        for server in servers.values():
            server.stop()
        if servers:
            say("Label Studio and the backend are stopped.")


if __name__ == "__main__":
    sys.exit(main())
