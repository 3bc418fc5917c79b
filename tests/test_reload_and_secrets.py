"""Config reload (SIGHUP, POST /-/reload), web security on every endpoint, and
secrets never shown anywhere."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from exporter.config.loader import load_config
from exporter.logs import setup_logging
from exporter.model import ErrorReason, State
from exporter.runtime import Exporter
from exporter.simulator import DEMO_CREDENTIALS, DemoCredentials, Fault, Simulator, create_app
from exporter.state import StateStore
from exporter.web import create_web_app
from tests.conftest import free_port, wait_until
from tests.test_faults import (
    CAP,
    CASES,
    Metrics,
    Upstream,
    World,
    apply,
    clear,
    steady_simulator,
)

ServerFactory = Callable[..., Awaitable[TestServer]]
ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, url: str, ids: list[str], key_file: str = "key") -> None:
    imports = "".join(f"\n      - id: '{i}'" for i in ids)
    path.write_text(
        f"""
sources:
  - name: elevate
    type: elevate
    url: {url}
    api_key_file: {key_file}
    interval: 0.3s
    timeout: 0.3s
    max_backoff: 0.3s
    imports:{imports}
"""
    )


async def simulator_url(aiohttp_server: ServerFactory, simulator: Simulator) -> str:
    server = await aiohttp_server(create_app(simulator))
    return str(server.make_url("")).rstrip("/")


async def test_reload_applies_valid_config_keeps_state_and_rejects_invalid(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    url = await simulator_url(aiohttp_server, Simulator())
    (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
    config_file = tmp_path / "config.yaml"
    write_config(config_file, url, ["1003", "1004"])
    exporter = Exporter(
        load_config(config_file), "127.0.0.1:0", None, lambda: load_config(config_file)
    )
    await exporter.start()
    state = exporter.state
    try:
        await wait_until(lambda: state.ready() and ("elevate", "1004") in state.imports)
        kept = state.imports[("elevate", "1004")]
        since = kept.state_since
        write_config(config_file, url, ["1004", "1005"])
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{exporter.port}/-/reload") as response:
                assert response.status == 200
            assert set(state.imports) == {("elevate", "1004"), ("elevate", "1005")}
            assert state.imports[("elevate", "1004")].state_since == since  # state kept
            await wait_until(lambda: state.imports[("elevate", "1005")].state is not None)

            config_file.write_text(
                "sources:\n  - name: elevate\n    type: elevate\n    interval: soon\n"
            )
            async with session.post(f"http://127.0.0.1:{exporter.port}/-/reload") as response:
                assert response.status == 400
                body = await response.json()
            assert any(
                "sources[0].interval: must be a duration like 30s" in e for e in body["errors"]
            )
            assert set(state.imports) == {
                ("elevate", "1004"),
                ("elevate", "1005"),
            }  # old config runs
            async with session.get(f"http://127.0.0.1:{exporter.port}/metrics") as response:
                text = await response.text()
            assert "import_exporter_config_last_reload_successful 0.0" in text
            assert "import_exporter_config_last_reload_success_timestamp_seconds" in text
    finally:
        await exporter.stop()


async def test_reload_rereads_secret_files(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    url = await simulator_url(aiohttp_server, Simulator())
    (tmp_path / "key").write_text("an-old-rotated-key")
    config_file = tmp_path / "config.yaml"
    write_config(config_file, url, ["1004"])
    exporter = Exporter(
        load_config(config_file), "127.0.0.1:0", None, lambda: load_config(config_file)
    )
    await exporter.start()
    source = exporter.state.sources["elevate"]
    try:
        await wait_until(lambda: source.errors_total[ErrorReason.UNAUTHORIZED] >= 1)
        (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
        assert await exporter.reload() == []
        await wait_until(lambda: exporter.state.imports[("elevate", "1004")].state is State.RUNNING)
        assert source.up is True
    finally:
        await exporter.stop()


async def test_sighup_reloads_the_running_process(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    url = await simulator_url(aiohttp_server, Simulator())
    (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
    config_file = tmp_path / "config.yaml"
    write_config(config_file, url, ["1004"])
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter", "--config.file", str(config_file),
        "--web.listen-address", f"127.0.0.1:{port}",
        "--storage.path", str(tmp_path / "state.db"), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:

            async def metrics() -> str:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                        return await response.text()
                except aiohttp.ClientError:
                    return ""

            async with asyncio.timeout(20):
                while 'import="1004"' not in await metrics():
                    await asyncio.sleep(0.1)
            write_config(config_file, url, ["1005"])
            proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(20):
                while True:
                    text = await metrics()
                    if 'import="1005"' in text and 'import="1004"' not in text:
                        break
                    await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_basic_auth_guards_every_endpoint_of_a_running_exporter(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    url = await simulator_url(aiohttp_server, Simulator())
    (tmp_path / "key").write_text(DEMO_CREDENTIALS.elevate_api_key)
    write_config(tmp_path / "config.yaml", url, ["1004"])
    hashed = bcrypt.hashpw(b"scrape-password", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "web.yml").write_text(f'basic_auth_users:\n  prometheus: "{hashed}"\n')
    exporter = Exporter(
        load_config(tmp_path / "config.yaml"), "127.0.0.1:0", str(tmp_path / "web.yml")
    )
    await exporter.start()
    good = "Basic " + base64.b64encode(b"prometheus:scrape-password").decode()
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/metrics", "/", "/-/healthy", "/-/ready"):
                target = f"http://127.0.0.1:{exporter.port}{path}"
                async with session.get(target) as response:
                    assert response.status == 401, path
            async with session.get(
                f"http://127.0.0.1:{exporter.port}/metrics", headers={"Authorization": good}
            ) as response:
                assert response.status == 200
            async with session.post(f"http://127.0.0.1:{exporter.port}/-/reload") as response:
                assert response.status == 401
    finally:
        await exporter.stop()


# Random-looking, so that any 8 characters of one found in the output are a leak.
SECRETS = {
    "api_key": "EkQ7vXw2KxPlm9f3aD",
    "client_secret": "Sf8cLsEcR3t5b2cQxW",
    "password": "Pw9dSfPaSs8e4kZqTu",
    "auth_token": "Rc4dTkN6e6fGh2JmVb",
    "token_json's access token": "00DzQ3stAtIcTkN8yRp",
    "api bearer token": "ApiBrR7tKn5q2Wz9LmX0",
}
STATIC_TOKEN_JSON = json.dumps(
    {
        "access_token": SECRETS["token_json's access token"],
        "instance_url": "https://acme.my.salesforce.com",
        "token_type": "Bearer",
        "signature": "c2lnOlJ4N0t3UXBaMnZN",
    }
)
ZILLIANT_ID = "7c9e6679-7425-40de-944b-e07fc1f69e29"
WHOLE_SECRETS = [STATIC_TOKEN_JSON, *SECRETS.values()]
"""Each also in its base64 form, as headers carry them."""
ECHO = "echo: " + " ".join(
    [*WHOLE_SECRETS, *(base64.b64encode(s.encode()).decode() for s in WHOLE_SECRETS)]
)


def leaks(text: str) -> list[str]:
    """What of the secrets shows in ``text``: any 8 characters in a row of one
    (a secret cut short is still a leak), or a whole one or its base64 form."""
    found = []
    for name, secret in SECRETS.items():
        if any(secret[i : i + 8] in text for i in range(len(secret) - 7)):
            found.append(name)
    for secret in WHOLE_SECRETS:
        if base64.b64encode(secret.encode()).decode() in text:
            found.append(f"base64 of {secret[:6]}...")
    if STATIC_TOKEN_JSON in text or json.loads(STATIC_TOKEN_JSON)["signature"] in text:
        found.append("token_json (whole or part)")
    return found


@contextlib.contextmanager
def formatted_logs() -> Iterator[dict[str, io.StringIO]]:
    """Everything logged at debug level, as the exporter's own handlers write it
    in both formats (setup_logging, pointed at buffers instead of stderr)."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access")
    saved_access = access.level
    streams = {"logfmt": io.StringIO(), "json": io.StringIO()}
    ours: list[logging.Handler] = []
    try:
        for fmt, stream in streams.items():
            with contextlib.redirect_stderr(stream):
                setup_logging("debug", fmt)
            ours += root.handlers
        root.handlers[:] = [*saved_handlers, *ours]
        yield streams
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        access.setLevel(saved_access)


def secrets_config(url: str) -> str:
    """Every kind of secret, given every way: file, inline, environment."""
    # The cap the fault list is made for.
    fast = f"interval: 0.1s, timeout: 0.1s, max_backoff: 0.1s, max_response_bytes: {CAP}"
    host = DEMO_CREDENTIALS.forwarded_host
    return f"""
api: {{tokens_file: tokens}}
sources:
  - {{name: elevate, type: elevate, url: "{url}", api_key_file: key, {fast},
      imports: [{{id: "1004"}}]}}
  - name: zilliant
    type: zilliant
    url: "{url}"
    forwarded_host: {host}
    salesforce:
      token_url: "{url}/services/oauth2/token"
      client_id: {DEMO_CREDENTIALS.client_id}
      client_secret: {SECRETS["client_secret"]}
      username: {DEMO_CREDENTIALS.username}
      password_file: password
    imports: [{{id: "{ZILLIANT_ID}"}}]
    interval: 0.1s
    timeout: 0.1s
    max_backoff: 0.1s
    max_response_bytes: {CAP}
  - {{name: zilliant-static, type: zilliant, url: "{url}", forwarded_host: {host},
      token_json_env: TEST_TOKEN_JSON, imports: [{{id: "{ZILLIANT_ID}"}}], {fast}}}
  - {{name: chat, type: rocketchat, url: "{url}", user_id: u1, auth_token_env: TEST_RC_TOKEN,
      {fast}}}
"""


def broken_config(url: str) -> str:
    """Invalid, with secrets inline right next to the mistakes."""
    return f"""
api: {{tokens_file: tokens-broken}}
sources:
  - {{name: elevate, type: elevate, url: "{url}", api_key: {SECRETS["api_key"]}, interval: soon}}
  - {{name: chat, type: rocketchat, url: "{url}", user_id: u1,
      auth_token: {SECRETS["auth_token"]}, auth_tokn: {SECRETS["auth_token"]}}}
  - {{name: zilliant-static, type: zilliant, url: "{url}", forwarded_host: x,
      token_json: '{{"access_token": "{SECRETS["token_json's access token"]}"'}}
"""


def failed_anew(exporter: Exporter, sources: list[str], reason: ErrorReason) -> Callable[[], bool]:
    """True once one of ``sources`` has failed a poll for ``reason`` since now."""
    seen = {name: exporter.state.sources[name].errors_total[reason] for name in sources}
    return lambda: any(
        exporter.state.sources[name].errors_total[reason] > count for name, count in seen.items()
    )


async def test_no_secret_appears_in_logs_pages_metrics_or_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    static_token = SECRETS["token_json's access token"]
    creds = DemoCredentials(
        elevate_api_key=SECRETS["api_key"],
        rocketchat_user_id="u1",
        rocketchat_auth_token=SECRETS["auth_token"],
        client_secret=SECRETS["client_secret"],
        password=SECRETS["password"],
    )
    upstream = Upstream(steady_simulator(credentials=creds))
    simulator = upstream.simulator
    simulator.tokens.add(static_token)  # the static token_json is valid
    monkeypatch.setenv("TEST_RC_TOKEN", SECRETS["auth_token"])
    monkeypatch.setenv("TEST_TOKEN_JSON", STATIC_TOKEN_JSON)
    (tmp_path / "key").write_text(SECRETS["api_key"])
    (tmp_path / "password").write_text(SECRETS["password"])
    (tmp_path / "tokens").write_text(f"# pipelines\n{SECRETS['api bearer token']}\n")
    (tmp_path / "tokens-broken").write_text(f"{SECRETS['api bearer token']} x\nshort\n")
    answers: dict[str, str] = {}
    with formatted_logs() as logs:
        await upstream.start()
        url = upstream.url
        (tmp_path / "config.yaml").write_text(secrets_config(url))
        (tmp_path / "broken.yaml").write_text(broken_config(url))
        exporter = Exporter(
            load_config(tmp_path / "config.yaml"),
            "127.0.0.1:0",
            None,
            lambda: load_config(tmp_path / "broken.yaml"),
        )
        await exporter.start()
        state = exporter.state
        world = World(simulator, upstream, exporter)
        try:
            # With the right secrets every source works...
            await wait_until(lambda: all(s.up for s in state.sources.values()))

            # ...then every fault of the list, each until a poll failed of it.
            for case in CASES.values():
                faults = await apply(world, case)
                simulator.tokens.add(static_token)
                await wait_until(failed_anew(exporter, case.affected(faults), case.reason))
                await clear(world, case)

            # Upstreams echo every secret back in their errors (some cut short,
            # where the exporter quotes them shortened)...
            pad = "x" * 30
            simulator.faults.update(
                {
                    "elevate": Fault(body=json.dumps({"id": pad + SECRETS["api_key"]}).encode()),
                    # a 401 sends the Salesforce source for a new token
                    "zilliant": Fault(status=401, body=ECHO.encode()),
                    "token": Fault(
                        status=400,
                        body=json.dumps({"error": pad * 2 + SECRETS["client_secret"]}).encode(),
                    ),
                    "rocketchat_progress": Fault(
                        status=400, body=json.dumps({"success": False, "error": ECHO}).encode()
                    ),
                }
            )
            token_calls = simulator.counters["token"]
            echoed = [
                lambda: simulator.counters["token"] > token_calls,
                failed_anew(exporter, ["elevate"], ErrorReason.INVALID_RESPONSE),
                failed_anew(exporter, ["zilliant"], ErrorReason.UNAUTHORIZED),
                failed_anew(exporter, ["zilliant-static"], ErrorReason.UNAUTHORIZED),
                failed_anew(exporter, ["chat"], ErrorReason.CLIENT_ERROR),
            ]
            await wait_until(lambda: all(done() for done in echoed))
            # ...and in answers that are otherwise fine, which are shown.
            simulator.faults = {
                "elevate": Fault(
                    body=json.dumps({"id": "1004", "status": ECHO, "reason": ECHO}).encode()
                ),
                "zilliant": Fault(body=json.dumps({"status": pad + ECHO}).encode()),
                "rocketchat_progress": Fault(
                    body=json.dumps({"success": True, "step": ECHO}).encode()
                ),
                "rocketchat_operation": Fault(
                    body=json.dumps({"operation": {"valid": True, "status": ECHO}}).encode()
                ),
            }
            await wait_until(
                lambda: all(r.state is State.UNKNOWN for r in state.imports.values()), timeout=10
            )

            async with aiohttp.ClientSession() as session:

                async def call(method: str, path: str, **kwargs: Any) -> int:
                    target = f"http://127.0.0.1:{exporter.port}{path}"
                    async with session.request(method, target, **kwargs) as response:
                        key = f"{method} {path} {kwargs.get('headers', '')}"
                        answers[key] = f"{response.headers}\n{await response.text()}"
                        return response.status

                bearer = {"Authorization": f"Bearer {SECRETS['api bearer token']}"}
                new = {"source": "zilliant-static", "id": "2587c81c-b9fc-4873-ae2f-421b292d2c2b"}
                assert await call("POST", "/api/v1/imports", json=new, headers=bearer) == 201
                mixup = {"Authorization": f"Bearer {SECRETS['api_key']}"}
                assert await call("POST", "/api/v1/imports", json=new, headers=mixup) == 401
                bad = {"source": "elevate", "id": "../1004"}
                assert await call("POST", "/api/v1/imports", json=bad, headers=bearer) == 400
                server = url.removeprefix("http://")
                for path in (
                    "/metrics",
                    "/",
                    "/?source=zilliant-static&state=unknown",
                    "/?source=chat&refresh=0",
                    "/?state=unknown",
                    "/api/v1/imports",
                    "/api/v1/imports?source=zilliant&state=unknown",
                    "/api/v1/imports/elevate/1004",
                    f"/api/v1/imports/zilliant/{ZILLIANT_ID}",
                    f"/api/v1/imports/zilliant-static/{ZILLIANT_ID}",
                    f"/api/v1/imports/chat/{server}",
                    "/api/v1/openapi.json",
                ):
                    assert await call("GET", path) == 200, path
                # 503 while the import just registered waits for its first poll
                assert await call("GET", "/-/ready") in (200, 503)
                openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
                assert await call("GET", "/metrics", headers=openmetrics) == 200
                assert await call("POST", "/-/reload") == 400  # the broken config
            errors = [f"{s.last_error}" for s in state.sources.values()]
            errors += [f"{r.last_error} {r.observation}" for r in state.imports.values()]
        finally:
            await exporter.stop()
            await upstream.stop()

    text = "\n".join([*answers.values(), *errors])
    for fmt, stream in logs.items():
        lines = stream.getvalue().splitlines()
        # The failed polls were logged, with their reason as a field of the line.
        said = "reason=timeout" if fmt == "logfmt" else '"reason": "timeout"'
        assert any(said in line for line in lines), fmt
        assert any("config reload failed" in line for line in lines), fmt
        if fmt == "json":
            assert all(isinstance(json.loads(line), dict) for line in lines)
        else:
            assert all(line.startswith("ts=") for line in lines)
        text += "\n" + stream.getvalue()
    # No secret shows anywhere, whole or in part...
    assert leaks(text) == []

    # ...though the faults and the echoes did reach all of that output.
    metrics = Metrics(answers["GET /metrics "].split("\n", 1)[1])
    for reason in ErrorReason:
        counted = [
            metrics.get("import_source_errors_total", source=n, reason=reason.value)
            for n in state.sources
        ]
        assert any(counted), reason
    assert re.search(r'upstream_state="echo: <redacted> <redacted>', answers["GET /metrics "])
    page = answers["GET /?source=zilliant-static&state=unknown "]
    assert "echo: &lt;redacted&gt; &lt;redacted&gt;" in page
    assert re.search(r'"upstream_state": ?"x*echo: <redacted>', answers["GET /api/v1/imports "])
    assert re.search(r'"reason": ?"echo: <redacted>', answers["GET /api/v1/imports/elevate/1004 "])
    assert "sources[0].interval: must be a duration" in answers["POST /-/reload "]
    assert "Salesforce token: HTTP 400 (xxxxx" in (state.sources["zilliant"].last_error or "")
    assert any("<redacted>" in e for e in errors)


async def test_reload_refuses_what_a_cross_site_page_can_send_but_not_curl() -> None:
    """A page on another site can POST a form to /-/reload: an Origin naming
    another host or a form content type is refused; curl -X POST still works."""
    reloads: list[int] = []

    async def reload() -> list[str]:
        reloads.append(1)
        return []

    app = create_web_app(StateStore(), CollectorRegistry(), reload=reload)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/-/reload"
    try:
        async with aiohttp.ClientSession() as session:
            refused: list[dict[str, str]] = [
                {"Origin": "https://evil.example"},
                {"Origin": f"http://127.0.0.1:{port + 1}"},
                {"Origin": "null"},
                {"Content-Type": "application/x-www-form-urlencoded"},
                {"Content-Type": "multipart/form-data; boundary=x"},
                {"Content-Type": "text/plain;charset=UTF-8"},
            ]
            for headers in refused:
                async with session.post(url, headers=headers, data=b"a=b") as response:
                    assert response.status == 403, headers
                    assert (await response.json())["status"] == "refused"
            assert reloads == []
            # The exporter's own page (same origin) and JSON clients may reload.
            same = {"Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json"}
            async with session.post(url, headers=same, data=b"{}") as response:
                assert response.status == 200
        curl = await asyncio.create_subprocess_exec(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(curl.communicate(), 30)
        assert out == b"200"
        assert len(reloads) == 2
    finally:
        await runner.cleanup()
