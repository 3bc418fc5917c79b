"""``--web.config.file``: TLS, client certificates, basic auth and response
headers, in the Prometheus exporter-toolkit format (the subset that matters).

It protects every endpoint (metrics, pages, API) alike. bcrypt checks are
cached, and an unknown user costs one bcrypt check too, so response times do
not tell which user names exist. Checks run on their own small worker pool with
a bounded queue: a client guessing passwords gets 429 once the queue is full and
never delays cached credentials, renders of /metrics or store writes (which use
the default executor).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import bcrypt
import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exporter.config import ConfigError, _describe_errors

ClientAuth = Literal[
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
]
TLSVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# The headers exporter-toolkit lets users set; anything else is a config error.
ALLOWED_HEADERS = frozenset(
    {
        "Cache-Control",
        "Content-Security-Policy",
        "Strict-Transport-Security",
        "X-Content-Type-Options",
        "X-Frame-Options",
        "X-XSS-Protection",
    }
)
_CACHE_SIZE = 1024
BCRYPT_WORKERS = 1
"""Threads checking passwords: one leaves the other cores to the event loop,
renders and polls however many wrong passwords arrive."""
BCRYPT_MAX_PENDING = 8
"""Distinct uncached checks running or queued at once; more answer 429 at once."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSServerConfig(_Strict):
    cert_file: str
    key_file: str
    client_auth_type: ClientAuth = "NoClientCert"
    client_ca_file: str | None = None
    min_version: TLSVersion = "TLS12"


class HTTPServerConfig(_Strict):
    headers: dict[str, str] = Field(default_factory=dict)


class WebConfig(_Strict):
    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig | None = None
    basic_auth_users: dict[str, str] = Field(default_factory=dict)


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web config file; raise ConfigError listing every problem."""
    origin = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError([f"{origin}: cannot read: {exc.strerror or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{origin}: invalid YAML: {exc}"]) from exc
    try:
        config = WebConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            [f"{origin}: {loc}: {msg}" for loc, msg in _describe_errors(exc)]
        ) from exc
    errors = []
    for user, hashed in config.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            errors.append(f"{origin}: basic_auth_users.{user}: must be a bcrypt hash")
    if config.http_server_config is not None:
        for name in config.http_server_config.headers:
            if name not in ALLOWED_HEADERS:
                errors.append(
                    f"{origin}: http_server_config.headers.{name}: not allowed "
                    f"(allowed: {', '.join(sorted(ALLOWED_HEADERS))})"
                )
    tls = config.tls_server_config
    if tls is not None:
        verifying = tls.client_auth_type != "NoClientCert"
        if verifying and tls.client_ca_file is None:
            errors.append(
                f"{origin}: tls_server_config.client_ca_file: required for "
                f"client_auth_type {tls.client_auth_type}"
            )
        if not errors:
            try:
                build_ssl_context(tls, Path(path).parent)
            except (OSError, ssl.SSLError) as exc:
                errors.append(f"{origin}: tls_server_config: cannot load certificates: {exc}")
    if errors:
        raise ConfigError(errors)
    return config


def build_ssl_context(tls: TLSServerConfig, base_dir: Path | None = None) -> ssl.SSLContext:
    def resolve(name: str) -> str:
        file = Path(name)
        return str(base_dir / file if base_dir is not None and not file.is_absolute() else file)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _TLS_VERSIONS[tls.min_version]
    context.load_cert_chain(resolve(tls.cert_file), resolve(tls.key_file))
    if tls.client_ca_file is not None:
        context.load_verify_locations(resolve(tls.client_ca_file))
    # Python's ssl verifies any certificate it is given, so "request" and
    # "verify if given" are the same here, as are the two "require" types.
    if tls.client_auth_type in ("RequireAnyClientCert", "RequireAndVerifyClientCert"):
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.client_auth_type in ("RequestClientCert", "VerifyClientCertIfGiven"):
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class PasswordChecksBusy(Exception):
    """Too many uncached password checks are queued: answer 429, do not wait."""


class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes, with a cache.

    Uncached checks run on a pool of their own (``workers`` threads) and at most
    ``max_pending`` distinct ones run or wait at once; beyond that :meth:`check`
    raises :class:`PasswordChecksBusy` at once. Concurrent requests with the
    same credentials share one check.
    """

    def __init__(
        self,
        users: dict[str, str],
        *,
        workers: int = BCRYPT_WORKERS,
        max_pending: int = BCRYPT_MAX_PENDING,
    ) -> None:
        self.users = {user: hashed.encode() for user, hashed in users.items()}
        # A real hash of a random password, so unknown users cost a check too.
        self._dummy = bcrypt.hashpw(b"unknown-user", bcrypt.gensalt(rounds=_cost(users)))
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcrypt")
        self._max_pending = max_pending
        self._pending: dict[bytes, asyncio.Future[bool]] = {}

    async def check(self, header: str | None) -> bool:
        credentials = _parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self.users.get(user)
        # The cache key is a digest, so the cache holds no password.
        key = hashlib.sha256(b"\0".join([user.encode(), password, hashed or b""])).digest()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        future = self._pending.get(key)
        if future is None:
            if len(self._pending) >= self._max_pending:
                raise PasswordChecksBusy
            target = hashed if hashed is not None else self._dummy
            future = asyncio.get_running_loop().run_in_executor(
                self._pool, bcrypt.checkpw, password, target
            )
            self._pending[key] = future
            future.add_done_callback(lambda done: self._settle(key, done, hashed is not None))
        # Shielded: a client hanging up does not cancel a check others share.
        return await asyncio.shield(future) and hashed is not None

    def _settle(self, key: bytes, done: asyncio.Future[bool], known: bool) -> None:
        self._pending.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return
        self._cache[key] = done.result() and known
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    def close(self) -> None:
        """Stop the worker threads (running checks finish; nobody waits)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _cost(users: dict[str, str]) -> int:
    for hashed in users.values():
        try:
            return int(hashed.split("$")[2])
        except (IndexError, ValueError):
            continue
    return 10


def _parse_basic(header: str | None) -> tuple[str, bytes] | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user.decode("utf-8", "replace"), password


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def security_middlewares(
    config: WebConfig, bypass: Callable[[web.Request], bool] | None = None
) -> list[Middleware]:
    """aiohttp middlewares applying basic auth and headers to every endpoint.

    A request for which ``bypass`` is true needs no basic auth (the API's own
    bearer token, see ``exporter.api.bearer_passes``)."""
    middlewares: list[Middleware] = []
    headers = dict(config.http_server_config.headers) if config.http_server_config else {}
    auth = BasicAuth(config.basic_auth_users) if config.basic_auth_users else None

    @web.middleware
    async def protect(request: web.Request, handler: Handler) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        if auth is not None and not (bypass is not None and bypass(request)):
            try:
                passed = await auth.check(request.headers.get("Authorization"))
            except PasswordChecksBusy:
                passed = False
                response = web.Response(
                    status=429,
                    text="Too many password checks waiting; retry later\n",
                    headers={"Retry-After": "1"},
                )
            if not passed and response is None:
                response = web.Response(
                    status=401,
                    text="Unauthorized\n",
                    headers={"WWW-Authenticate": 'Basic realm="import-status-exporter"'},
                )
        if response is None:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = exc
        for name, value in headers.items():
            response.headers[name] = value
        return response

    middlewares.append(protect)
    return middlewares


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(a.encode(), b.encode())
