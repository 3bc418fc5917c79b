"""Every code block of the README is run (or, where it cannot run here, checked
against what it names), so the README cannot drift from the product.

A new code block without a check fails test_every_code_block_has_a_check.
Commands that would leave loopback or change the machine are run against
stand-ins, said at each check: `kubectl apply -k` is rendered with `kubectl
kustomize` (no cluster), the systemd install goes into a temporary root, the
Docker commands are checked against the Dockerfile (no Docker engine), and the
example config's upstream URLs are pointed at a closed loopback port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import pytest
import trustme
import yaml

from exporter.cli import build_parser
from exporter.config.loader import parse_config_data
from exporter.runtime import Exporter
from exporter.simulator import Phase, Simulator, create_app
from exporter.simulator.scenarios import elevate
from exporter.webconfig import load_web_config
from grafana.mixin import main as mixin_main
from grafana.mixin_config import parse_config as parse_mixin
from tests.conftest import free_port, tool, wait_until_sync
from tests.integration.grafana_helpers import ROOT, mixin_data

README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
PROGRAM = VENV_BIN / "import-status-exporter"


def code_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def block(start: str) -> str:
    (found,) = [text for _, text in code_blocks() if text.startswith(start)]
    return found


def logical_lines(text: str) -> list[str]:
    """Shell lines with backslash continuations joined; comments kept as lines."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def http(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


@contextlib.contextmanager
def running(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            yield
            assert proc.poll() is None, log.read_text()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, log.read_text()


def state_of(metrics: str, source: str, import_id: str) -> str | None:
    pattern = rf'import_state\{{[^}}]*import="{re.escape(import_id)}"[^}}]*source="{source}"'
    pattern += r'[^}]*state="(\w+)"[^}]*\} 1\.0'
    found = re.findall(pattern, metrics)
    return found[0] if found else None


# --- the checks, one per block ----------------------------------------------


def check_demo(tmp_path: Path) -> None:
    """`./scripts/demo` (at --demo.speed 10, on a free port), then the curl
    registration of a walk-in id, the story, and the demo's 400 on reload."""
    (command,) = logical_lines(block("./scripts/demo"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [*shlex.split(command), "--demo.speed", "10", f"--web.listen-address=127.0.0.1:{port}"]
    with running(args, tmp_path / "demo.log"):
        wait_until_sync(lambda: http(f"{base}/-/ready")[0] == 200, 180, "the demo to be ready")
        # The story, in 15 simulated seconds (1.5 s at speed 10).
        story = {
            "1001": "succeeded",
            "1002": "failed",
            "1005": "aborted",
            "1003": "blocked",
            "1004": "running",
            "1006": "pending",
        }

        def told() -> bool:
            metrics = http(f"{base}/metrics")[1]
            return all(state_of(metrics, "elevate-demo", i) == s for i, s in story.items())

        wait_until_sync(told, 15, "the demo's story")
        (curl,) = logical_lines(block("curl -H 'Authorization: Bearer demo-api-token"))
        curl = curl.replace("http://localhost:10451", base)
        result = subprocess.run(
            [*shlex.split(curl), "-s", "-o", "/dev/null", "-w", "%{http_code}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.stdout == "201", result.stdout + result.stderr
        seen: list[str] = []

        def moved() -> bool:
            state = state_of(http(f"{base}/metrics")[1], "elevate-demo", "5001")
            if state and (not seen or seen[-1] != state):
                seen.append(state)
            return state == "succeeded"

        wait_until_sync(moved, 30, "the registered import to succeed")
        assert [s for s in seen if s != "pending"] == ["waiting", "running", "succeeded"]
        # As `curl -X POST .../-/reload` sends it (no form content type).
        status, body = http(
            f"{base}/-/reload", data=b"", headers={"Content-Type": "application/json"}
        )
        assert status == 400
        assert "not started from a config file" in body
    text = README.read_text()
    assert "5001" in text
    assert "`5002`" in text
    assert "answers `400`" in text


def check_scripts_test(_tmp_path: Path) -> None:
    """`./scripts/test` is what CI runs (and what runs this test)."""
    assert logical_lines(block("./scripts/test")) == ["./scripts/test"]
    assert "exec bash scripts/test" in (ROOT / ".ci" / "run").read_text()
    script = (ROOT / "scripts" / "test").read_text()
    for step in ("scripts/setup --test", "ruff check", "ruff format --check", "mypy", "pytest"):
        assert step in script


def loopback_config(tmp_path: Path) -> Path:
    """config.yaml with every upstream URL pointed at a closed loopback port."""
    text = (ROOT / "config.yaml").read_text()
    text = re.sub(r"cluster_id: \S+", "url: http://127.0.0.1:9", text)
    text = re.sub(r"(url|token_url): https://\S+", r"\1: http://127.0.0.1:9", text)
    assert "https://" not in "\n".join(line.split("#")[0] for line in text.splitlines()), (
        "an upstream URL was left"
    )
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def check_running_for_real(tmp_path: Path) -> None:
    lines = logical_lines(block("./scripts/setup"))
    commands = [line.split("#")[0].strip() for line in lines]
    assert commands[0] == "./scripts/setup"
    subprocess.run(["bash", "scripts/setup"], cwd=ROOT, check=True, timeout=600)
    env_names = ["ELEVATE_API_KEY", "SALESFORCE_CLIENT_SECRET", "SALESFORCE_PASSWORD"]
    env_names.append("ROCKETCHAT_AUTH_TOKEN")
    section = README.read_text().split("## Running it for real", 1)[1].split("```", 1)[0]
    for name in env_names:
        assert f"`{name}`" in section, name
    config = loopback_config(tmp_path)
    bare = {k: v for k, v in os.environ.items() if k not in env_names}
    check = shlex.split(commands[1].replace("config.yaml", str(config)))
    missing = subprocess.run(check, capture_output=True, text=True, cwd=ROOT, env=bare)
    assert missing.returncode == 1
    for name in env_names:  # every missing variable, in one go
        assert f"environment variable {name} is not set" in missing.stderr
    with_env = {**bare, **{name: "not-a-real-secret" for name in env_names}}
    ok = subprocess.run(check, capture_output=True, text=True, cwd=ROOT, env=with_env)
    assert ok.returncode == 0, ok.stderr
    assert "OK (3 sources" in ok.stdout, ok.stderr
    port = free_port()
    run = [*shlex.split(commands[2].replace("config.yaml", str(config)))]
    run.append(f"--web.listen-address=127.0.0.1:{port}")
    with running(run, tmp_path / "real.log", env=with_env):
        wait_until_sync(
            lambda: http(f"http://127.0.0.1:{port}/-/healthy")[0] == 200, 60, "the exporter"
        )


def check_web_yml(tmp_path: Path) -> None:
    """The web.yml example loads as written (with real files for its names)."""
    text = block("tls_server_config:")
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server = ca.issue_cert("exporter.example.com", key_type=trustme.KeyType.RSA)
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "clients-ca.crt"))
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    assert "$2b$12$..." in text
    (tmp_path / "web.yml").write_text(text.replace("$2b$12$...", f"'{hashed}'"))
    config = load_web_config(str(tmp_path / "web.yml"))
    assert config.tls is not None
    assert config.basic_auth_users


def check_pipeline(tmp_path: Path) -> None:
    """track, list, untrack as written, against an exporter with source elevate-prod."""
    lines = logical_lines(block("export IMPORT_STATUS_EXPORTER_TOKEN"))
    import_id = "5537431447739019570"

    async def scenario() -> None:
        sim = Simulator(speed=1.0)
        sim.add_elevate_import(import_id, elevate(Phase(0, "FAILURE", "bad file")))
        from aiohttp import web

        runner = web.AppRunner(create_app(sim))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        sim_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        token = base64.b32encode(os.urandom(20)).decode()
        (tmp_path / "tokens").write_text(token + "\n")
        config = parse_config_data(
            {
                "api": {"tokens_file": str(tmp_path / "tokens")},
                "sources": [
                    {
                        "name": "elevate-prod",
                        "type": "elevate",
                        "url": sim_url,
                        "api_key": sim.credentials.elevate_api_key,
                        "interval": "1s",
                        "timeout": "1s",
                    }
                ],
            },
            "pipeline test",
        )
        exporter = Exporter(config, "127.0.0.1:0")
        await exporter.start()
        url = f"http://127.0.0.1:{exporter.port}"
        env = dict(os.environ)
        try:
            commands: list[tuple[list[str], list[str]]] = []
            for line in lines:
                if line.startswith("export "):
                    name = line.split()[1].split("=")[0]
                    env[name] = token
                elif line.startswith("# "):
                    commands[-1][1].append(line[2:])
                else:
                    args = shlex.split(line.replace("http://exporter-host:10451", url))
                    assert args[0] == "import-status-exporter"
                    commands.append(([str(PROGRAM), *args[1:]], []))
            for args, expected in commands:
                if "list" in args:  # after the import's first poll
                    async with asyncio.timeout(20):
                        while exporter.state.ready() is False:
                            await asyncio.sleep(0.1)
                proc = await asyncio.create_subprocess_exec(
                    *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
                )
                out, err = await proc.communicate()
                assert proc.returncode == 0, err.decode()
                assert out.decode().splitlines() == expected, (args, out, err)
        finally:
            await exporter.stop()
            await runner.cleanup()

    asyncio.run(scenario())


def check_prometheus_snippet(_tmp_path: Path) -> None:
    snippet = yaml.safe_load(block("rule_files: [../grafana/alerts.yaml]"))
    example = yaml.safe_load((ROOT / "examples" / "prometheus.yml").read_text())
    assert snippet["rule_files"] == example["rule_files"]
    assert (ROOT / "examples" / snippet["rule_files"][0]).resolve() == (
        ROOT / "grafana" / "alerts.yaml"
    )
    (job,) = snippet["scrape_configs"]
    (example_job,) = example["scrape_configs"]
    for key in ("job_name", "scrape_timeout", "static_configs"):
        assert job[key] == example_job[key], key
    assert parse_mixin(mixin_data()).selector == f'job="{job["job_name"]}"'


def check_threshold_snippet(tmp_path: Path) -> None:
    data = mixin_data()
    data["thresholds"] |= yaml.safe_load(block("thresholds:\n  sources:"))["thresholds"]
    config = tmp_path / "mixin.yaml"
    config.write_text(yaml.safe_dump(data))
    assert mixin_main(["--config", str(config), "--out", str(tmp_path)]) == 0
    assert 'source=~"elevate-big|elevate-eu"' in (tmp_path / "grafana" / "alerts.yaml").read_text()


def check_mixin_commands(tmp_path: Path) -> None:
    """The generator (into a temporary tree: the committed files are checked
    by test_mixin), then promtool as written, in the repository."""
    lines = logical_lines(block(".venv/bin/python -m grafana.mixin"))
    assert lines[0] == ".venv/bin/python -m grafana.mixin"
    assert mixin_main(["--out", str(tmp_path)]) == 0
    for relative in ("grafana/alerts.yaml", "grafana/dashboards/import-status.json"):
        assert (tmp_path / relative).read_text() == (ROOT / relative).read_text()
    promtool = tool("promtool")
    for line in lines[1:]:
        args = shlex.split(line)
        assert args[0] == "promtool"
        result = subprocess.run([promtool, *args[1:]], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stdout + result.stderr


def check_kubectl(_tmp_path: Path) -> None:
    """`kubectl apply -k DIR` is `kubectl kustomize DIR` sent to a cluster: render it."""
    kubectl = tool("kubectl")
    for line in logical_lines(block("kubectl apply -k")):
        args = shlex.split(line)
        assert args[:3] == ["kubectl", "apply", "-k"]
        result = subprocess.run(
            [kubectl, "kustomize", args[3]], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode == 0, result.stderr
        assert "kind: PrometheusRule" in result.stdout


def check_systemd_install(tmp_path: Path) -> None:
    """The install commands, into a temporary root (systemctl needs a booted
    systemd: it is checked to name the unit that was installed)."""
    root = tmp_path / "root"
    for line in logical_lines(block("sudo install -m 0644 examples/systemd")):
        for command in line.split("&&"):
            args = shlex.split(command.replace("/etc/", f"{root}/etc/"))
            assert args[0] == "sudo"
            args = args[1:]
            if args[0] == "systemctl":
                assert args[-1] == "import-status-exporter" or args[1] == "daemon-reload"
                continue
            if args[0] == "install" and "-d" not in args:
                Path(args[-1]).mkdir(parents=True, exist_ok=True)
            subprocess.run(args, cwd=ROOT, check=True, timeout=30)
    unit = root / "etc" / "systemd" / "system" / "import-status-exporter.service"
    assert (
        unit.read_text() == (ROOT / "examples/systemd/import-status-exporter.service").read_text()
    )
    assert (root / "etc" / "import-status-exporter" / "config.yaml").exists()
    assert "--config.file=/etc/import-status-exporter/config.yaml" in unit.read_text()


def check_docker(_tmp_path: Path) -> None:
    """No Docker engine here: the commands are checked against the Dockerfile."""
    build, run = logical_lines(block("docker build -t import-status-exporter ."))
    assert shlex.split(build)[-1] == "."
    assert (ROOT / "Dockerfile").exists()
    args = shlex.split(run.replace("$PWD", str(ROOT)))
    image = args.index("import-status-exporter")
    mounts = [args[i + 1] for i, a in enumerate(args[:image]) if a == "-v"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    config_in_image = re.search(r"IMPORT_STATUS_EXPORTER_CONFIG_FILE=(\S+)", dockerfile)
    storage_in_image = re.search(r"IMPORT_STATUS_EXPORTER_STORAGE_PATH=(\S+)", dockerfile)
    assert config_in_image
    assert storage_in_image
    host_config, target, _ = mounts[0].split(":")
    assert Path(host_config) == ROOT / "config.yaml"
    assert target == config_in_image.group(1)
    assert mounts[1].split(":")[1] == str(Path(storage_in_image.group(1)).parent)
    assert args[args.index("-p") + 1] == "10451:10451"
    assert 'CMD ["--web.listen-address=:10451"]' in dockerfile
    build_parser().parse_args(args[image + 1 :])  # the flags after the image parse


def check_own_api(tmp_path: Path) -> None:
    """The "Your own API" section: the example config loads, and check-config reads an
    answer of that API as the console block shows (the curl is replaced by
    the answer it would save)."""
    config = tmp_path / "config.yaml"
    config.write_text(block("sources:\n  - name: acme-jobs"))
    console = block("$ curl -s").splitlines()
    command = console[1].removeprefix("$ ").replace("config.yaml", str(config))
    saved = tmp_path / "saved.json"
    answer = {
        "job": {
            "status": "running",
            "rowsDone": 1200,
            "rowsTotal": 5000,
            "startedAt": "2026-11-25T09:00:00Z",
        }
    }
    saved.write_text(json.dumps(answer))
    args = [str(PROGRAM), *shlex.split(command)[1:]]
    args = [str(saved) if a == "saved.json" else a for a in args]
    env = {**os.environ, "ACME_TOKEN": "not-a-real-token"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    shown = result.stdout.replace(str(config), "config.yaml").replace(str(saved), "saved.json")
    assert shown.splitlines() == console[2:]


def check_diagram(tmp_path: Path) -> None:
    """The data-flow picture of "How it works": not a command."""


CHECKS: dict[str, Callable[[Path], None]] = {
    "./scripts/demo": check_demo,
    "curl -H 'Authorization: Bearer demo-api-token": check_demo,
    "./scripts/test": check_scripts_test,
    "./scripts/setup": check_running_for_real,
    "tls_server_config:": check_web_yml,
    "export IMPORT_STATUS_EXPORTER_TOKEN": check_pipeline,
    "config.yaml, POST /api/v1/imports ->": check_diagram,
    "rule_files: [../grafana/alerts.yaml]": check_prometheus_snippet,
    "thresholds:\n  sources:": check_threshold_snippet,
    ".venv/bin/python -m grafana.mixin": check_mixin_commands,
    "kubectl apply -k": check_kubectl,
    "sudo install -m 0644 examples/systemd": check_systemd_install,
    "docker build -t import-status-exporter .": check_docker,
    "sources:\n  - name: acme-jobs": check_own_api,
    "$ curl -s": check_own_api,
}


def test_every_code_block_has_a_check() -> None:
    for _, text in code_blocks():
        starts = [start for start in CHECKS if text.startswith(start)]
        assert len(starts) == 1, f"README block without a check in tests/test_readme.py:\n{text}"


@pytest.mark.parametrize(
    "check",
    sorted(set(CHECKS.values()), key=lambda c: str(getattr(c, "__name__", c))),
    ids=lambda c: str(getattr(c, "__name__", c)).removeprefix("check_"),
)
def test_readme_block(check: Callable[[Path], None], tmp_path: Path) -> None:
    check(tmp_path)


def test_help_shows_the_pipeline_commands() -> None:
    result = subprocess.run([str(PROGRAM), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("track", "untrack", "list"):
        assert re.search(rf"^\s+{command}\s", result.stdout, flags=re.M), command


def test_readme_says_what_the_demo_story_takes() -> None:
    from exporter.demo import DEMO_INTERVAL
    from exporter.simulator.scenarios import DEMO_STORY_SECONDS, demo_scenarios

    scenarios = demo_scenarios()
    final_at = max(
        script.phases[-1].at
        for scripts in (scenarios.elevate, scenarios.zilliant)
        for script in scripts.values()
    )
    assert final_at + DEMO_INTERVAL <= DEMO_STORY_SECONDS == 15
    assert "unfolds in its first 15\nseconds" in README.read_text()
    assert set(scenarios.walk_ins) == {"5001", "5002"}
    assert json.dumps(sorted(scenarios.walk_ins)) == '["5001", "5002"]'
