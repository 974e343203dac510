"""How long `label-studio-sam2 ... --help` takes: the interpreter's start and the imports a command
line pays before it prints anything (issue 25: every `--help` took 6-9 s, all of it torch).

    .venv/bin/python -m bench.cli_help [--repeats 3]
Prints a table (median wall time of each command line, and whether torch was imported) and writes
bench/results/cli_help.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine, report

RESULTS = Path(__file__).parent / "results" / "cli_help.json"
REPO = Path(__file__).resolve().parent.parent
COMMANDS = (
    ["--help"],
    ["serve", "--help"],
    ["train", "--help"],
    ["warm", "--help"],
    ["worker", "--help"],
    ["preannotate", "--help"],
    ["train"],  # a command-line error (--project is required): argparse's message, exit 2
)


def run(argv: list[str]) -> tuple[float, bool]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "label_studio_sam2", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode not in (0, 2):  # 2: argparse's exit for a command-line error
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return seconds, "torch" in modules


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per command line (default: 3)")
    args = p.parse_args()
    cpu, load = machine()
    rows, results = [], {}
    for argv in COMMANDS:
        times, torch_loaded = [], False
        for _ in range(args.repeats):
            seconds, torch_loaded = run(argv)
            times.append(seconds)
        label = "python -m label_studio_sam2 " + " ".join(argv)
        results[label] = {"median_s": statistics.median(times), "imports_torch": torch_loaded}
        rows.append((label, f"{statistics.median(times):.2f} s", "imports torch" if torch_loaded else ""))
    result = {
        "model": "no model",
        "image": f"{cpu}, load {load}",
        "torch_threads": "n/a",
        "repeats": args.repeats,
        "commands": results,
    }
    report(result, rows, RESULTS)


if __name__ == "__main__":
    main()
