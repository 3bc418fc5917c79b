"""examples/systemd: the unit passes systemd-analyze verify and is hardened."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

from tests.conftest import tool
from tests.integration.grafana_helpers import ROOT

UNIT = ROOT / "examples" / "systemd" / "import-status-exporter.service"


def systemd_analyze() -> str:
    path = tool("systemd-analyze")
    return path


def installed_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's program (verify
    checks that the binary exists)."""
    program = Path(sys.executable).parent / "import-status-exporter"
    assert program.exists(), "scripts/setup installs the package"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/import-status-exporter", str(program)))
    return unit


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", str(installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_analyze_security_rates_exposure_2_or_less(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=yes",
            "--threshold=20",
            str(installed_copy(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout


def test_dynamic_user_state_directory_reload_and_hardening() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "import-status-exporter"
    assert "--storage.path=${STATE_DIRECTORY}/imports.db" in service["ExecStart"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == value, key
