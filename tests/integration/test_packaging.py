"""The package and the image: a wheel that installs into a fresh virtualenv and
runs the demo; a Dockerfile that follows the container conventions; a health
check that finds the exporter's port and TLS by itself.

There is no Docker engine on CI machines: the Dockerfile is checked as text,
and the health check script it installs is run here against real exporters.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import trustme

from tests.conftest import free_port, wait_until_sync
from tests.integration.grafana_helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


def status(url: str, context: object = None) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:  # type: ignore[call-overload]
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@contextlib.contextmanager
def exporter(program: Path, *args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen([str(program), *args], stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the wheel -------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("import_status_exporter-*.whl")
    return built


def test_wheel_metadata_license_and_typing(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    assert "exporter/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert "Project-URL: Source, https://github.com/" in metadata
    # Only the program: no tests, grafana or deploy files in the wheel.
    assert {n.split("/", 1)[0] for n in names if "/" in n} <= {
        "exporter",
        metadata_name.split("/", 1)[0],
    }


def test_wheel_installs_into_a_fresh_venv_and_runs_the_demo(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    result = subprocess.run(
        [*pip, "install", "--quiet", "--constraint", str(ROOT / "constraints.txt"), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    program = venv / "bin" / "import-status-exporter"
    port = free_port()
    with exporter(
        program, "--demo", f"--web.listen-address=127.0.0.1:{port}", log=tmp_path / "demo.log"
    ) as proc:
        wait_until_sync(
            lambda: proc.poll() is not None or status(f"http://127.0.0.1:{port}/-/ready") == 200,
            60,
            "the installed demo to be ready",
        )
        assert proc.poll() is None, (tmp_path / "demo.log").read_text()
    assert proc.returncode == 0


# --- the Dockerfile ---------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_entrypoint_is_the_program_and_cmd_only_flags() -> None:
    found = dict(instructions())
    assert json.loads(found["ENTRYPOINT"]) == ["import-status-exporter"]
    cmd = json.loads(found["CMD"])
    assert cmd
    assert all(arg.startswith("--") for arg in cmd)
    # The config and storage paths are defaults of the program in the image,
    # so `docker run image --log.level=debug` (which replaces CMD) keeps them.
    env = dict(
        pair.split("=", 1)
        for key, rest in instructions()
        if key == "ENV"
        for pair in shlex.split(rest)
    )
    assert env["IMPORT_STATUS_EXPORTER_CONFIG_FILE"] == "/etc/import-status-exporter/config.yaml"
    assert env["IMPORT_STATUS_EXPORTER_STORAGE_PATH"].startswith("/var/lib/import-status-exporter/")


def test_the_image_defaults_are_honoured_by_the_program(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("sources: []\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "import-status-exporter"), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"IMPORT_STATUS_EXPORTER_CONFIG_FILE": str(config), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert str(config) in result.stdout


def test_no_volume_oci_labels_pinned_base_and_constraints() -> None:
    found = instructions()
    keywords = [k for k, _ in found]
    assert "VOLUME" not in keywords
    (base,) = [rest for k, rest in found if k == "FROM"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    labels = " ".join(rest for k, rest in found if k == "LABEL")
    for key in ("title", "description", "version", "licenses", "source", "url", "documentation"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    run = " ".join(rest for k, rest in found if k == "RUN")
    assert "--constraint constraints.txt" in run
    assert any(k == "USER" and rest == "10001" for k, rest in found)
    (check,) = [rest for k, rest in found if k == "HEALTHCHECK"]
    assert check.endswith('CMD ["import-status-healthcheck"]')
    copies = [rest for k, rest in found if k == "COPY"]
    assert "docker/healthcheck.py /usr/local/bin/import-status-healthcheck" in copies


# --- the health check -------------------------------------------------------


def healthcheck(pid: int) -> int:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--pid", str(pid)], timeout=30, capture_output=True
    ).returncode


def test_healthcheck_finds_the_port_and_route_prefix_plain_http(tmp_path: Path) -> None:
    program = Path(sys.executable).parent / "import-status-exporter"
    port = free_port()
    with exporter(
        program,
        "--demo",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.external-url=http://proxy.example.com/imports/",
        log=tmp_path / "log",
    ) as proc:
        wait_until_sync(
            lambda: status(f"http://127.0.0.1:{port}/imports/-/healthy") == 200, 30, "the exporter"
        )
        assert healthcheck(proc.pid) == 0
    assert healthcheck(proc.pid) == 1  # gone: no such process, nothing listening


def test_healthcheck_speaks_tls_and_takes_401_as_alive(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("exporter.example.com")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n"
        f"  cert_file: {tmp_path / 'server.pem'}\n"
        f"  key_file: {tmp_path / 'server.pem'}\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    program = Path(sys.executable).parent / "import-status-exporter"
    port = free_port()
    with exporter(
        program,
        "--demo",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.config.file={tmp_path / 'web.yml'}",
        log=tmp_path / "log",
    ) as proc:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        wait_until_sync(
            lambda: status(f"https://127.0.0.1:{port}/-/healthy", context) == 401,
            30,
            "the TLS exporter",
        )
        assert healthcheck(proc.pid) == 0
