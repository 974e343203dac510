"""Settings come from the environment, typed and validated; docs/configuration.md documents every variable
the code reads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from label_studio_sam2.service.settings import Settings, SettingsError, env_table

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def test_environment_values_are_typed(monkeypatch):
    monkeypatch.setenv("MEDIA_ALLOWED_HOSTS", "media.example.com, cdn.example.org")
    monkeypatch.setenv("LABEL_STUDIO_HOST", "http://ls.example:8080/")  # the alias Label Studio sets
    monkeypatch.setenv("LABEL_STUDIO_ACCESS_TOKEN", "tok-123")
    monkeypatch.setenv("BACKGROUND_JOB", "off")
    monkeypatch.setenv("EMBEDDING_STORE_GB", "2.5")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("SAM2_MODEL", "")  # empty counts as unset
    s = Settings.from_env(device="cpu")
    assert s.media_allowed_hosts == ("media.example.com", "cdn.example.org")
    assert s.label_studio_url == "http://ls.example:8080" and s.label_studio_api_key == "tok-123"
    assert s.background_job is False and s.store_gb == 2.5 and s.log_level == "DEBUG"
    assert s.model == "facebook/sam2.1-hiera-tiny" and s.device == "cpu"
    assert "tok-123" not in repr(s)


def test_the_primary_name_wins_over_its_alias(monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://primary")
    monkeypatch.setenv("LABEL_STUDIO_HOST", "http://alias")
    assert Settings.from_env().label_studio_url == "http://primary"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("RETRIEVE_MODE", "box", "'boxes', 'auto' or 'none'"),
        ("OUTPUT", "svg", "'auto', 'brush' or 'polygon'"),
        ("EMBEDDING_CACHE_MB", "-1", "greater than or equal to 0"),
        ("QUEUE_SIZE", "six", "valid integer"),
        ("PREDICT_DEADLINE_S", "soon", "valid number"),
        ("DEVICE", "gpu", "pattern"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch, variable, value, says):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as e:
        Settings.from_env()
    assert variable in str(e.value) and says in str(e.value)


def test_a_bad_secret_is_named_but_not_shown():
    with pytest.raises(SettingsError) as e:
        Settings.from_env(basic_auth_pass=["not", "a", "string"])
    assert "BASIC_AUTH_PASS" in str(e.value) and "not" not in str(e.value)


def test_an_unknown_override_is_a_programming_error():
    with pytest.raises(TypeError, match="unknown setting"):
        Settings.from_env(retrive_mode="auto")


def test_a_bad_variable_stops_the_cli_with_its_name():
    env = {"PATH": "/usr/bin:/bin", "RETRIEVE_MODE": "boxs", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [PY, "-m", "label_studio_sam2", "serve", "--model", "tiny"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "RETRIEVE_MODE='boxs'" in out.stderr and "Traceback" not in out.stderr


def test_the_configuration_table_is_the_settings_class():
    page = (REPO / "docs" / "configuration.md").read_text()
    table = re.search(r"<!-- env-table:start -->\n(.*?)\n<!-- env-table:end -->", page, re.S)
    assert table, "docs/configuration.md lost its env-table markers"
    assert table.group(1) == env_table(), (
        "docs/configuration.md's table is stale: run `python tools/env_table.py`"
    )


def test_every_variable_the_code_reads_is_documented():
    """Environment variables read directly (not through Settings) are named in docs/configuration.md."""
    page = (REPO / "docs" / "configuration.md").read_text()
    pattern = re.compile(
        r"""(?:os\.environ\.get|getenv)\(\s*["']([A-Z][A-Z0-9_]+)["']|os\.environ\[["']([A-Z][A-Z0-9_]+)["']\]"""
    )
    read = set()
    for folder in ("label_studio_sam2", "deploy"):
        for path in (REPO / folder).rglob("*.py"):
            for m in pattern.finditer(path.read_text()):
                read.add(m.group(1) or m.group(2))
    missing = sorted(name for name in read if f"`{name}`" not in page)
    assert not missing, f"read by the code but not in docs/configuration.md: {missing}"


def test_prefetch_is_on_by_default_on_cpu_and_off_when_set_to_0(app_factory, monkeypatch, tmp_path):
    """PREFETCH_TASKS defaults to 3 (bench.prefetch: no click delayed on CPU); 0 switches it off."""
    monkeypatch.delenv("PREFETCH_TASKS")
    creds = {"label_studio_url": "http://ls.invalid", "label_studio_api_key": "k", "store_dir": str(tmp_path)}
    runtime = app_factory(**creds).extensions["sam2"]
    assert runtime.prefetcher is not None and runtime.prefetcher.enabled
    assert runtime.settings.prefetch_tasks == 3
    assert app_factory(**creds, prefetch_tasks=0).extensions["sam2"].prefetcher is None


# --- renamed variables: the admission queue and the job queue ----------------------------------


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("QUEUE_SIZE", "ADMISSION_QUEUE_SIZE", "admission_queue_size"),
        ("QUEUE_CHUNK_TASKS", "JOB_CHUNK_TASKS", "job_chunk_tasks"),
    ],
)
def test_an_old_name_still_works_with_a_warning_and_the_new_name_wins(monkeypatch, caplog, old, new, field):
    monkeypatch.delenv(new, raising=False)
    monkeypatch.setenv(old, "3")
    with caplog.at_level("WARNING", "label_studio_sam2"):
        assert getattr(Settings.from_env(), field) == 3
    assert f"{old} is deprecated: rename it {new}" in caplog.text
    caplog.clear()
    monkeypatch.setenv(new, "5")
    with caplog.at_level("WARNING", "label_studio_sam2"):
        assert getattr(Settings.from_env(), field) == 5
    assert f"{old} is ignored: {new}" in caplog.text
    caplog.clear()
    monkeypatch.delenv(old)
    with caplog.at_level("WARNING", "label_studio_sam2"):
        assert getattr(Settings.from_env(), field) == 5
    assert old not in caplog.text  # the new name alone: nothing to say


def test_a_bad_value_under_an_old_name_is_named_as_the_user_wrote_it(monkeypatch):
    monkeypatch.delenv("ADMISSION_QUEUE_SIZE", raising=False)
    monkeypatch.setenv("QUEUE_SIZE", "six")
    with pytest.raises(SettingsError, match="QUEUE_SIZE='six'"):
        Settings.from_env()


def test_a_bad_redis_url_read_from_the_environment_never_shows_its_password(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "http://:hunter2-secret@redis:6379/0")
    with pytest.raises(SettingsError) as e:
        Settings.from_env()
    assert "REDIS_URL" in str(e.value) and "hunter2-secret" not in str(e.value)


# --- what the engine used to read from the environment itself ----------------------------------


def test_the_engines_directories_and_hub_access_come_from_settings(monkeypatch, tmp_path):
    """SAM2_FINETUNE_DIR, SAM2_CONVERTED_DIR, XDG_CACHE_HOME, HF_HUB_OFFLINE and HF_ENDPOINT are
    read here, once; the engine is given them (label_studio_sam2.service.runtime)."""
    for name in ("SAM2_FINETUNE_DIR", "SAM2_CONVERTED_DIR", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s = Settings.from_env()
    assert s.finetune_dir == str(tmp_path / "cache" / "label-studio-sam2" / "finetuned")
    assert s.converted_dir == str(tmp_path / "cache" / "label-studio-sam2")
    assert s.hub_offline is False and s.hub_endpoint == "https://huggingface.co"
    monkeypatch.setenv("SAM2_FINETUNE_DIR", str(tmp_path / "ft"))
    monkeypatch.setenv("SAM2_CONVERTED_DIR", str(tmp_path / "converted"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    s = Settings.from_env()
    assert s.finetune_dir == str(tmp_path / "ft") and s.converted_dir == str(tmp_path / "converted")
    assert s.hub_offline is True and s.hub_endpoint == "https://hf-mirror.example"
