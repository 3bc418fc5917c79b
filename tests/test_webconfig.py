"""--web.config.file: TLS, mTLS, basic auth and headers on every endpoint."""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import trustme
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from exporter.config import ConfigError
from exporter.config.loader import parse_config_data
from exporter.runtime import Exporter
from exporter.web import metrics_handler
from exporter.webconfig import (
    BasicAuth,
    build_ssl_context,
    load_web_config,
    security_middlewares,
)
from exporter.webconfig.security import BCRYPT_MAX_PENDING


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
    context = build_ssl_context(config.tls, config_path.parent) if config.tls else None
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
        # The toolkit's header allow-list and values.
        (
            "http_server_config: {headers: {Cache-Control: no-store}}\n",
            "http_server_config.headers.Cache-Control: not allowed",
        ),
        (
            "http_server_config: {headers: {X-Frame-Options: allow-from x}}\n",
            "http_server_config.headers.X-Frame-Options: must be one of deny, sameorigin",
        ),
        (
            "http_server_config: {headers: {X-Content-Type-Options: sniff}}\n",
            "http_server_config.headers.X-Content-Type-Options: must be one of nosniff",
        ),
        ("tls_server_config: {cert_file: a}\n", "missing one of key or key_file"),
        ("tls_server_config: {key: k}\n", "missing one of cert or cert_file"),
        (
            "tls_server_config: {cert_file: a, key_file: b, client_ca_file: c}\n",
            "tls_server_config.client_auth_type: client CAs are configured without",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, client_allowed_sans: [x]}\n",
            "tls_server_config.client_allowed_sans: needs a client_auth_type",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, client_auth_type: Sometimes}\n",
            "tls_server_config.client_auth_type",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, min_version: TLS13,"
            " max_version: TLS12}\n",
            "tls_server_config.max_version: TLS12 is below min_version",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b,"
            " cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]}\n",
            "tls_server_config.cipher_suites[0]: unknown cipher 'TLS_RSA_WITH_RC4_128_SHA'",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b,"
            " curve_preferences: [X25519, CurveP256]}\n",
            "tls_server_config.curve_preferences: Python's ssl offers one curve only",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, curve_preferences: [P-256]}\n",
            "tls_server_config.curve_preferences[0]",
        ),
        ("rate_limit: {interval: 1s, burst: 0}\n", "rate_limit.burst: must be at least 1"),
        ("rate_limit: {interval: soon, burst: 1}\n", "rate_limit.interval: must be a duration"),
        ("http_server_config: {http2: maybe}\n", "http_server_config.http2"),
        # PyYAML raised these as a KeyError, let through as a traceback.
        (
            "http_server_config: {http2: !!bool maybe}\n",
            "line 1, column 29: invalid YAML: not a valid !!bool",
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


def every_key_web_yml(
    tmp_path: Path, ca: trustme.CA, server: trustme.LeafCert, headers: dict[str, str]
) -> Path:
    """A web.yml carrying every key of the exporter-toolkit format."""

    def block(text: str) -> str:
        return "|\n" + "".join(f"    {line}\n" for line in text.splitlines())

    header_lines = "".join(f"    {name}: {value!r}\n" for name, value in headers.items())
    return write(
        tmp_path,
        f"""
tls_server_config:
  cert: {block(server.cert_chain_pems[0].bytes().decode())}
  key: {block(server.private_key_pem.bytes().decode())}
  client_ca: {block(ca.cert_pem.bytes().decode())}
  client_auth_type: RequireAndVerifyClientCert
  client_allowed_sans: [pipeline.example.com, "::1"]
  min_version: TLS12
  max_version: TLS13
  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]
  curve_preferences: [X25519]
  prefer_server_cipher_suites: true
http_server_config:
  http2: true
  headers:
{header_lines}rate_limit:
  interval: 1h
  burst: 6
basic_auth_users:
  prometheus: "{HASH}"
""",
    )


TOOLKIT_HEADERS = {
    "Content-Security-Policy": "default-src 'self'",
    "X-Frame-Options": "sameorigin",
    "X-Content-Type-Options": "nosniff",
    "X-XSS-Protection": "1; mode=block",
    "Strict-Transport-Security": "max-age=31536000",
}


async def test_a_web_yml_with_every_toolkit_key_is_served_as_it_says(tmp_path: Path) -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server = ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)
    path = every_key_web_yml(tmp_path, ca, server, TOOLKIT_HEADERS)

    def client(*sans: str, tls12: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        ca.issue_cert(*sans, key_type=trustme.KeyType.RSA).configure_cert(context)
        if tls12:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        return context

    good = {"Authorization": basic("prometheus", "right-password")}
    async for port in serve(path):
        url = f"https://127.0.0.1:{port}/metrics"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, ssl=client("pipeline.example.com"), headers=good) as r:
                assert r.status == 200
                assert await r.text() == "metrics here"
                assert {k: r.headers[k] for k in TOOLKIT_HEADERS} == TOOLKIT_HEADERS
            # Over TLS 1.2 the one configured cipher is the one negotiated.
            async with session.get(url, ssl=client("::1", tls12=True), headers=good) as r:
                assert r.status == 200
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client("::1", tls12=True), server_hostname="127.0.0.1"
            )
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object.version() == "TLSv1.2"
            assert ssl_object.cipher()[0] == "ECDHE-RSA-AES128-GCM-SHA256"
            writer.close()
            # A certificate of the right CA without an allowed SAN is refused.
            async with session.get(url, ssl=client("intruder.example.com"), headers=good) as r:
                assert r.status == 403
            async with session.get(url, ssl=client("pipeline.example.com")) as r:
                assert r.status == 401
                assert r.headers["X-Frame-Options"] == "sameorigin"
            # burst 6, one token an hour: the next requests are rate limited.
            statuses = []
            for _ in range(4):
                async with session.get(url, ssl=client("pipeline.example.com"), headers=good) as r:
                    statuses.append(r.status)
            assert statuses[-1] == 429
            assert statuses.count(429) >= 2


def test_a_go_only_setting_is_refused_naming_the_file_and_field(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cipher Go knows but this Python's OpenSSL lacks is an error, not ignored."""
    real = ssl.SSLContext.get_ciphers

    def without_chacha(self: ssl.SSLContext) -> list[Any]:
        return [c for c in real(self) if "CHACHA20" not in c["name"]]

    monkeypatch.setattr(ssl.SSLContext, "get_ciphers", without_chacha)
    path = write(
        certs,
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.pem\n"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,"
        " TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256]\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    [line] = caught.value.errors
    assert line.startswith(f"{path}: tls_server_config.cipher_suites: not available")
    assert line.endswith("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256")


async def test_reload_rotates_the_certificate_and_applies_the_web_config(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """POST /-/reload (and SIGHUP, which calls the same reload) reads the web
    config again: new connections get the new certificate, headers and users;
    an invalid file changes nothing."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    tls = "tls_server_config: {cert_file: server.pem, key_file: server.pem}\n"
    path = write(tmp_path, tls + "http_server_config: {headers: {X-Frame-Options: deny}}\n")
    config = parse_config_data({"sources": []}, "test")
    exporter = Exporter(config, "127.0.0.1:0", str(path), lambda: config)
    await exporter.start()
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    base = f"https://127.0.0.1:{exporter.port}"

    async def served_certificate() -> bytes:
        _, writer = await asyncio.open_connection("127.0.0.1", exporter.port, ssl=trusting)
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return der

    try:
        async with aiohttp.ClientSession() as session:
            before = await served_certificate()
            async with session.get(f"{base}/-/healthy", ssl=trusting) as response:
                assert response.headers["X-Frame-Options"] == "deny"
            rotated = ca.issue_cert("127.0.0.1")
            rotated.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
            users = f'basic_auth_users: {{prometheus: "{HASH}"}}\n'
            path.write_text(
                tls + users + "http_server_config: {headers: {X-Frame-Options: sameorigin}}\n"
            )
            async with session.post(f"{base}/-/reload", ssl=trusting) as response:
                assert response.status == 200
            after = await served_certificate()
            assert after != before
            assert after == ssl.PEM_cert_to_DER_cert(rotated.cert_chain_pems[0].bytes().decode())
            good = {"Authorization": basic("prometheus", "right-password")}
            async with session.get(f"{base}/-/healthy", ssl=trusting) as response:
                assert response.status == 401
                assert response.headers["X-Frame-Options"] == "sameorigin"
            async with session.get(f"{base}/-/healthy", ssl=trusting, headers=good) as response:
                assert response.status == 200

            path.write_text(tls + users + "http_server_config: {headers: {Cache-Control: x}}\n")
            async with session.post(f"{base}/-/reload", ssl=trusting, headers=good) as response:
                assert response.status == 400
                errors = (await response.json())["errors"]
            assert errors == [
                f"{path}: http_server_config.headers.Cache-Control: not allowed (allowed: "
                "Content-Security-Policy, Strict-Transport-Security, X-Content-Type-Options, "
                "X-Frame-Options, X-XSS-Protection)"
            ]
            path.write_text(users)
            async with session.post(f"{base}/-/reload", ssl=trusting, headers=good) as response:
                assert response.status == 400
                assert "turning TLS on or off needs a restart" in (await response.text())
            async with session.get(f"{base}/-/healthy", ssl=trusting, headers=good) as response:
                assert response.headers["X-Frame-Options"] == "sameorigin"  # still in force
            assert await served_certificate() == after
    finally:
        await exporter.stop()
