"""`python -m label_studio_sam2 ...`: help a user can act on, and a server that stays on this machine unless
told otherwise."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from label_studio_sam2.cli.main import build_parser, exposure_warning, listen_address, serve_settings
from label_studio_sam2.service.settings import Settings, SettingsError


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_has_the_commands_the_readme_names():
    assert {"serve", "make-test-model", "convert", "preannotate", "warm"} <= set(_subcommands())


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_option_of_every_command_is_explained_with_its_default(name, capsys):
    parser = _subcommands()[name]
    assert parser.description and len(parser.description) > 40, f"{name} --help has no description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        what = "/".join(action.option_strings) or action.dest
        assert action.help, f"{name} {what} has no help text"
        if (
            action.option_strings
            and not action.required
            and not isinstance(action, argparse._StoreTrueAction)
        ):
            # a value the user does not give comes from somewhere: the help says where
            assert "default" in action.help, f"{name} {what}: the help does not say its default"
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([name, "--help"])
    assert exit_.value.code == 0
    assert parser.description.split()[0] in capsys.readouterr().out


def _listens_on(*argv: str) -> tuple[str, int]:
    return listen_address(serve_settings(build_parser().parse_args(["serve", *argv])))


def test_serve_listens_on_loopback_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("HOST", raising=False)
    monkeypatch.delenv("PORT", raising=False)
    assert _listens_on() == ("127.0.0.1", 9090)
    monkeypatch.setenv("HOST", "0.0.0.0")  # what the Docker image sets
    monkeypatch.setenv("PORT", "9191")
    assert _listens_on() == ("0.0.0.0", 9191)
    assert _listens_on("--host", "127.0.0.1", "--port", "9292") == ("127.0.0.1", 9292)  # flags win
    dockerfile = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    assert re.search(r"^\s+HOST=0\.0\.0\.0 \\$", dockerfile, re.M), "the image must listen on every interface"


def test_a_bad_port_is_a_setting_error_naming_port_not_a_crash_of_every_command(monkeypatch):
    """HOST and PORT are read by Settings (validated), not by the parser: `PORT=abc` used to make
    every command, `--help` included, die in a ValueError traceback."""
    monkeypatch.setenv("PORT", "abc")
    args = build_parser().parse_args(["serve"])
    with pytest.raises(SettingsError, match="PORT='abc'"):
        serve_settings(args)


def test_listening_beyond_loopback_without_auth_is_warned_about():
    open_ = Settings.from_env(basic_auth_user=None)
    open_.basic_auth_user = None
    warning = exposure_warning("0.0.0.0", 9090, open_)
    assert warning and "BASIC_AUTH_USER" in warning and "9090" in warning
    assert "ALLOWED_HOSTS" in warning  # why Label Studio, calling by another name, gets a 403
    assert exposure_warning("127.0.0.1", 9090, open_) is None
    assert (
        exposure_warning("0.0.0.0", 9090, Settings.from_env(basic_auth_user="ml", basic_auth_pass="pw"))
        is None
    )


def test_warm_takes_the_label_studio_url_and_key_like_preannotate():
    for name in ("warm", "preannotate"):
        args = build_parser().parse_args(
            [name, "--project", "3", "--url", "http://ls:8080", "--api-key", "k"]
        )
        assert (args.url, args.api_key) == ("http://ls:8080", "k")


@pytest.mark.parametrize(
    "argv",
    [["--help"]]
    + [[name, "--help"] for name in sorted(_subcommands())]
    # a mistake on the command line: argparse's message, exit 2, before any command's code loads
    + [
        ["train"],
        ["warm"],
        ["preannotate", "--project", "1", "--mode", "nope"],
        ["worker", "--threads", "x"],
    ],
)
def test_help_answers_without_importing_torch(argv):
    # `--help` took 6-9 s when every command's module (and torch with it) was imported up front;
    # then `train|warm|worker|preannotate --help` still did (their parsers lived with their code)
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "label_studio_sam2", *argv],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    if "--help" in argv:
        assert proc.returncode == 0 and "usage: label-studio-sam2" in proc.stdout
    else:
        assert proc.returncode == 2 and "label-studio-sam2 " + argv[0] + ": error:" in proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "label_studio_sam2" in imported  # -X importtime did report
    assert not {"torch", "transformers", "label_studio_sdk"} & imported


def test_the_top_level_help_lists_every_command_with_its_line():
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices) and all(helps.values())
    text = " ".join(parser.format_help().split())
    for name, line in helps.items():
        assert f"{name} {' '.join(line.split())}" in text


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_command_runs_code_that_exists(name):
    # the parsers name their command's code by "module:function" (imported when it runs): a
    # misspelt one would only fail when a user runs the command
    import importlib

    required = {"make-test-model": ["DIR"], "convert": ["CKPT", "DIR"], "serve": [], "worker": []}
    fn = build_parser().parse_args([name, *required.get(name, ["--project", "1"])]).fn
    target = getattr(fn, "target", None)
    if target:
        module, _, function = target.partition(":")
        fn = getattr(importlib.import_module(module), function)
    assert callable(fn) and fn.__name__.startswith("cmd_")


@pytest.mark.parametrize("name", ["serve", "train", "warm", "preannotate", "worker"])
def test_every_command_that_loads_the_model_takes_the_names_make_run_takes(name, monkeypatch):
    # `make run MODEL=test` serves the tiny trained SAM2; `train --model test` was refused
    from label_studio_sam2.service.settings import DEMO_TEST_MODEL, TEST_MODEL_FIXTURE

    argv = [name] + ([] if name in ("serve", "worker") else ["--project", "1"]) + ["--model", "test"]
    args = build_parser().parse_args(argv)
    settings = Settings.from_env(model=args.model)
    served = DEMO_TEST_MODEL if (DEMO_TEST_MODEL / "config.json").is_file() else TEST_MODEL_FIXTURE
    assert settings.model == str(served) and (Path(settings.model) / "config.json").is_file()
    # with nothing given, every command loads what the server loads: SAM2_MODEL
    monkeypatch.setenv("SAM2_MODEL", "test")
    args = build_parser().parse_args(argv[:-2])
    assert Settings.from_env(model=args.model).model == str(served)


@pytest.mark.parametrize("queue", [False, True])
def test_warm_says_a_label_studio_error_in_one_line_and_fails(httpserver, tmp_path, queue):
    # it printed a traceback ending in `LabelStudioAPIError: reading project 1: HTTP 401`
    import subprocess
    import sys

    httpserver.expect_request(re.compile(".*")).respond_with_json({"detail": "Invalid token."}, status=401)
    root = Path(__file__).resolve().parents[1]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LABEL_STUDIO_API_KEY": "s3cret-token",
        "REDIS_URL": "redis://127.0.0.1:1/0",  # --queue reads the project before it needs Redis
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "label_studio_sam2",
            "warm",
            "--project",
            "1",
            "--store",
            str(tmp_path / "store"),
        ]
        + ["--url", httpserver.url_for("/").rstrip("/")]
        + (["--queue"] if queue else []),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env=env,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "s3cret-token" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "warm: reading project 1: HTTP 401: Invalid token."
