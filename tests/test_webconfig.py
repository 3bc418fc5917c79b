"""--web.config.file: TLS, mTLS, basic auth and headers on every endpoint."""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from exporter.config import ConfigError
from exporter.web import metrics_handler
from exporter.webconfig import (
    BCRYPT_MAX_PENDING,
    BasicAuth,
    build_ssl_context,
    load_web_config,
    security_middlewares,
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


HASH = bcrypt.hashpw(b"right-password", bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(tmp_path: Path, ca: trustme.CA) -> Path:
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return tmp_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return path


async def serve(
    config_path: Path,
) -> AsyncIterator[int]:
    config = load_web_config(config_path)
    app = web.Application(middlewares=security_middlewares(config))

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="metrics here")

    app.router.add_get("/metrics", hello)
    context = (
        build_ssl_context(config.tls_server_config, config_path.parent)
        if config.tls_server_config
        else None
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_tls_serves_and_mtls_rejects_a_client_without_certificate(
    certs: Path, ca: trustme.CA
) -> None:
    path = write(
        certs,
        """
tls_server_config:
  cert_file: server.pem
  key_file: server.pem
  client_ca_file: ca.pem
  client_auth_type: RequireAndVerifyClientCert
  min_version: TLS12
""",
    )
    client_cert = ca.issue_cert("client@example.com")
    with_cert = ssl.create_default_context()
    ca.configure_trust(with_cert)
    client_cert.configure_cert(with_cert)
    without_cert = ssl.create_default_context()
    ca.configure_trust(without_cert)
    async for port in serve(path):
        async with aiohttp.ClientSession() as session:
            url = f"https://127.0.0.1:{port}/metrics"
            async with session.get(url, ssl=with_cert) as response:
                assert response.status == 200
                assert await response.text() == "metrics here"
            with pytest.raises(aiohttp.ClientError):
                async with session.get(url, ssl=without_cert) as response:
                    await response.read()
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    await response.read()


async def test_plain_tls_without_client_auth(certs: Path, ca: trustme.CA) -> None:
    path = write(certs, "tls_server_config: {cert_file: server.pem, key_file: server.pem}\n")
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async for port in serve(path):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{port}/metrics", ssl=trusting) as response:
                assert response.status == 200


async def test_basic_auth_and_headers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
basic_auth_users:
  prometheus: "{HASH}"
http_server_config:
  headers:
    X-Frame-Options: deny
""",
    )
    async for port in serve(path):
        url = f"http://127.0.0.1:{port}/metrics"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Basic")
                assert response.headers["X-Frame-Options"] == "deny"
            for user, password in [("prometheus", "wrong"), ("nobody", "right-password")]:
                async with session.get(
                    url, headers={"Authorization": basic(user, password)}
                ) as response:
                    assert response.status == 401
            good = {"Authorization": basic("prometheus", "right-password")}
            async with session.get(url, headers=good) as response:
                assert response.status == 200
                assert response.headers["X-Frame-Options"] == "deny"


async def test_bcrypt_is_cached_and_unknown_users_cost_a_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = BasicAuth({"prometheus": HASH})
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    good = basic("prometheus", "right-password")
    assert await auth.check(good)
    assert await auth.check(good)
    assert len(calls) == 1  # the second check came from the cache
    unknown = basic("nobody", "x")
    assert not await auth.check(unknown)
    assert len(calls) == 2  # an unknown user still paid for one bcrypt check
    assert not await auth.check("Basic !!!")
    assert not await auth.check(None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "tls_server_config: {cert_file: a, key_file: b, cipher: x}\n",
            "tls_server_config.cipher: unknown field",
        ),
        ("basic_auth_users: {u: plain}\n", "basic_auth_users.u: must be a bcrypt hash"),
        (
            "http_server_config: {headers: {Server: x}}\n",
            "http_server_config.headers.Server: not allowed",
        ),
        ("nonsense: 1\n", "nonsense: unknown field"),
        (
            "tls_server_config: {cert_file: a, key_file: b,"
            " client_auth_type: RequireAndVerifyClientCert}\n",
            "tls_server_config.client_ca_file: required",
        ),
        (
            "tls_server_config: {cert_file: /nope.pem, key_file: /nope.pem}\n",
            "cannot load certificates",
        ),
    ],
)
def test_bad_web_config_is_rejected_with_the_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert any(expected in line for line in caught.value.errors), caught.value.errors
    assert all(line.startswith(str(path)) for line in caught.value.errors)


async def test_password_guessing_gets_429_and_never_delays_cached_users_or_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guesses queue on bcrypt's own pool; beyond its bound they get 429 at
    once, while a cached user and /metrics (rendered on the default executor)
    keep being served."""
    path = write(tmp_path, f'basic_auth_users: {{prometheus: "{HASH}"}}\n')
    config = load_web_config(path)
    registry = CollectorRegistry()
    Gauge("answer", "a metric", registry=registry).set(42)
    app = web.Application(middlewares=security_middlewares(config))
    app.router.add_get("/metrics", metrics_handler(registry))
    gate = threading.Event()
    real = bcrypt.checkpw

    def slow_for_guesses(password: bytes, hashed: bytes) -> bool:
        if password.startswith(b"guess"):
            gate.wait(30)  # a bcrypt check that takes as long as the test wants
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", slow_for_guesses)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    good = {"Authorization": basic("prometheus", "right-password")}
    try:
        async with aiohttp.ClientSession() as session:

            async def get(headers: dict[str, str]) -> int:
                async with session.get(url, headers=headers) as response:
                    await response.read()
                    return response.status

            assert await get(good) == 200  # now cached
            guesses = [
                asyncio.create_task(get({"Authorization": basic("prometheus", f"guess-{n}")}))
                for n in range(3 * BCRYPT_MAX_PENDING)
            ]
            for refused, done in enumerate(asyncio.as_completed(guesses, timeout=10), 1):
                assert await done == 429
                if refused == 2 * BCRYPT_MAX_PENDING:
                    break
            # The pool is stuck on guesses; the cached user and /metrics are not.
            for _ in range(5):
                async with asyncio.timeout(5):
                    async with session.get(url, headers=good) as response:
                        assert response.status == 200
                        assert "answer 42.0" in await response.text()
            gate.set()
            statuses = await asyncio.wait_for(asyncio.gather(*guesses), 30)
            assert statuses.count(401) == BCRYPT_MAX_PENDING
            assert statuses.count(429) == 2 * BCRYPT_MAX_PENDING
    finally:
        gate.set()
        await runner.cleanup()
