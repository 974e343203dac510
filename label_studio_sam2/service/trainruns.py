"""A project's fine-tuning runs as the CLI and the server report them.

`label-studio-sam2 train` records each run in `project-<id>/runs.json` beside the versions
(`label_studio_sam2.engine.finetuned_decoders`): when it started, by which process, and how it ended (the held-out scores, the
version it wrote and where, whether it was activated, or why it failed). `train --status` prints
them as a table; the server's `TrainingLauncher` logs the outcome of a run it started from it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

RUNS = "runs.json"
KEEP = 10  # runs remembered per project


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_runs(project_dir: Path) -> list[dict]:
    """The project's runs, the latest first ([] when none was recorded or the file is unreadable)."""
    try:
        runs = json.loads((Path(project_dir) / RUNS).read_text())
    except (OSError, ValueError):
        return []
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _write(project_dir: Path, runs: list[dict]) -> None:
    project_dir = Path(project_dir)
    project_dir.mkdir(parents=True, exist_ok=True)
    tmp = project_dir / f".{RUNS}.{os.getpid()}"
    tmp.write_text(json.dumps(runs[:KEEP], indent=2) + "\n")
    os.replace(tmp, project_dir / RUNS)


def start_run(project_dir: Path, model: str) -> dict:
    """Record a run of this process as running; returns its record (give it to `end_run`)."""
    run = {"state": "running", "pid": os.getpid(), "started": _now(), "model": model}
    _write(project_dir, [run] + read_runs(project_dir))
    return run


def end_run(project_dir: Path, run: dict, state: str, **outcome) -> dict:
    """Record how `run` ended: state finished | failed | interrupted, with what it found."""
    ended = {**run, **outcome, "state": state, "ended": _now()}
    runs = read_runs(project_dir)
    same = [i for i, r in enumerate(runs) if (r.get("pid"), r.get("started")) == (run["pid"], run["started"])]
    if same:
        runs[same[0]] = ended
    else:
        runs.insert(0, ended)
    _write(project_dir, runs)
    return ended


def alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def state_of(run: dict) -> str:
    """A run's state; one recorded as running whose process is gone ended without a word."""
    state = str(run.get("state", "?"))
    if state == "running" and not alive(run.get("pid")):
        return "died"
    return state


def _seconds(run: dict) -> float | None:
    try:
        start = datetime.fromisoformat(run["started"])
        end = datetime.fromisoformat(run["ended"]) if run.get("ended") else datetime.now(UTC)
    except (KeyError, TypeError, ValueError):
        return None
    return (end - start).total_seconds()


def _took(run: dict) -> str:
    s = _seconds(run)
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h {s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _scores(metrics: dict | None, kind: str) -> str:
    try:
        return f"{metrics['before'][kind]:.3f} -> {metrics['after'][kind]:.3f}"
    except (KeyError, TypeError, ValueError):
        return "-"


def outcome(run: dict) -> str:
    """One sentence: what a run decided (or why it failed)."""
    state = state_of(run)
    if state == "running":
        return f"running (pid {run.get('pid')})"
    if state == "died":
        return "ended without a result (killed?): see train.log"
    if state == "interrupted":
        return "interrupted: run the same command again to resume"
    if state == "failed":
        return f"failed: {run.get('error') or '?'}"
    version = run.get("version")
    if not version:
        return "finished without a version"
    if run.get("activated"):
        return f"activated {version}: this project's model_version is now {run.get('model_version')}"
    return (
        f"kept {version} but not activated: it does not improve held-out mIoU by {run.get('min_gain', '?')}"
    )


def summary(project: int, run: dict) -> str:
    """The log line of a run's end: its decision, held-out scores and where the version is."""
    parts = [f"project {project}: fine-tuning {state_of(run)} after {_took(run)}: {outcome(run)}"]
    if run.get("metrics"):
        parts.append(
            f"held-out 1-click mIoU {_scores(run['metrics'], 'click_miou')}, "
            f"box mIoU {_scores(run['metrics'], 'box_miou')}"
        )
    if run.get("path"):
        parts.append(f"written to {run['path']}")
    return "; ".join(parts)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain aligned columns (the last one free)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [str(r[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def runs_table(runs: list[dict]) -> str:
    rows = [
        [
            state_of(r),
            str(r.get("started", "?")).replace("T", " ")[:19],
            _took(r),
            str(r.get("pid", "?")),
            _scores(r.get("metrics"), "click_miou"),
            _scores(r.get("metrics"), "box_miou"),
            outcome(r) + (f" ({r['path']})" if r.get("path") else ""),
        ]
        for r in runs
    ]
    return table(["state", "started (UTC)", "took", "pid", "1-click mIoU", "box mIoU", "outcome"], rows)


def versions_table(versions: list[str], manifests: dict[str, dict], active: str | None) -> str:
    rows = []
    for v in versions:
        m = manifests.get(v) or {}
        examples = m.get("examples") or {}
        rows.append(
            [
                v,
                "yes" if v == active else "",
                str(m.get("date", "?")).replace("T", " ")[:19],
                f"{examples.get('train', '?')}/{examples.get('val', '?')}",
                _scores(m.get("metrics"), "click_miou"),
                _scores(m.get("metrics"), "box_miou"),
                str(m.get("base_model", "?")),
            ]
        )
    return table(
        ["version", "active", "date (UTC)", "train/held out", "1-click mIoU", "box mIoU", "base model"], rows
    )
