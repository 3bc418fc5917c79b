"""``--config.expand-env`` and ``check-config --source NAME --answer FILE``:
one file for every environment, and a recipe built without a live server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.config import ConfigError
from exporter.config.loader import load_config

CONFIG = """
sources:
  - name: jobs
    type: http_json
    system: ${JOB_SYSTEM:-acme}
    url: ${JOB_URL}
    auth: {type: bearer, token: "${JOB_TOKEN}"}
    request: {path: "/jobs/{id}"}
    extract:
      state: state
      completed: counts.done
      ended: finishedAt
      reason: error
    states: {DONE: succeeded, FAILED: failed}
    not_found: {status: [404], when: "code == 'NOT_FOUND'"}
  - name: e
    type: elevate
    url: http://127.0.0.1:9
    api_key: pkA123456789AB1BE
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JOB_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("JOB_TOKEN", "env-token-123456")
    monkeypatch.delenv("JOB_SYSTEM", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    return path


def test_expand_env_with_defaults(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = load_config(config_file, expand_env=True).sources[0]
    assert getattr(source, "url", None) == "http://127.0.0.1:9/api"
    assert getattr(source, "system", None) == "acme"
    assert "env-token-123456" in set(load_config(config_file, expand_env=True).secret_values())
    monkeypatch.setenv("JOB_SYSTEM", "salesforce")
    assert getattr(load_config(config_file, expand_env=True).sources[0], "system", None) == (
        "salesforce"
    )


def test_without_the_flag_nothing_is_expanded(config_file: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert any("sources[0].url: must be an http" in line for line in caught.value.errors)


def test_unset_variable_without_default_is_an_error_naming_it(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOB_URL")
    monkeypatch.delenv("JOB_TOKEN")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, expand_env=True)
    assert caught.value.errors == [
        f"{config_file}: line 6: environment variable JOB_URL is not set "
        "(give it, or a default: ${JOB_URL:-default})",
        f"{config_file}: line 7: environment variable JOB_TOKEN is not set "
        "(give it, or a default: ${JOB_TOKEN:-default})",
    ]


def test_check_config_reads_a_saved_answer(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "saved.json"
    saved.write_text(
        json.dumps({"state": "DONE", "counts": {"done": 12}, "finishedAt": "2024-05-01T10:00:00Z"})
    )
    args = ["check-config", "--config.file", str(config_file), "--config.expand-env"]
    assert main([*args, "--source", "jobs", "--answer", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "source jobs (system acme) reads:" in out
    assert "  state: succeeded\n" in out
    assert "  upstream_state: DONE\n" in out
    assert "  items_completed: 12\n" in out
    assert "  ended_at: 2024-05-01T10:00:00Z (1714557600)\n" in out
    assert "reason" not in out  # absent fields are not printed


def test_check_config_answers_with_status_and_errors(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["check-config", "--config.file", str(config_file), "--config.expand-env"]
    missing = tmp_path / "missing.json"
    missing.write_text('{"code": "NOT_FOUND"}')
    assert (
        main([*args, "--source", "jobs", "--answer", str(missing), "--answer.status", "404"]) == 0
    )
    assert "  state: not_found\n" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text('{"nostate": 1}')
    assert main([*args, "--source", "jobs", "--answer", str(broken)]) == 1
    assert "error invalid_response: acme: extract.state found no string" in capsys.readouterr().out
    assert main([*args, "--source", "e", "--answer", str(broken)]) == 1
    assert "--answer reads http_json sources only" in capsys.readouterr().err
    assert main([*args, "--source", "nope", "--answer", str(broken)]) == 1
    assert main([*args, "--source", "jobs"]) == 2
