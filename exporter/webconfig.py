"""``--web.config.file``: TLS, client certificates, basic auth, response
headers and a rate limit, in the Prometheus exporter-toolkit format: every key
of its ``web/tls_config.go`` is accepted, with the toolkit's rules (header
allow-list and values, cert or cert_file, file paths relative to the file).
Where Python's ``ssl`` cannot do what a key asks (a cipher this OpenSSL lacks,
more than one curve), the file is refused with the field named, never ignored.
aiohttp serves HTTP/1.1: ``http_server_config.http2`` is accepted and says so.

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
import ipaddress
import re
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import bcrypt
import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from exporter.config import ConfigError, describe_errors

ClientAuth = Literal[
    "",
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "RequireClientCert",  # the toolkit keeps it for backwards compatibility
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
]
TLSVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]
Curve = Literal["CurveP256", "CurveP384", "CurveP521", "X25519"]

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CURVES = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}
# Go's names (those of tls.CipherSuites(), all the toolkit accepts) -> OpenSSL's.
_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
# TLS 1.3 suites: Go accepts their names and cannot configure them; neither
# can Python's ssl. All three stay on, as with the toolkit.
_TLS13_CIPHERS = frozenset(
    {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
)
# The headers exporter-toolkit lets users set, with the values it allows
# (None: any value). Cache-Control is not among them.
ALLOWED_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_CACHE_SIZE = 1024
BCRYPT_WORKERS = 1
"""Threads checking passwords: one leaves the other cores to the event loop,
renders and polls however many wrong passwords arrive."""
BCRYPT_REST = 1.0
"""After each check the password thread rests this many times as long."""
BCRYPT_MAX_PENDING = 8
"""Distinct uncached checks running or queued at once; more answer 429 at once."""

_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0}
_GO_UNITS.update({"m": 60.0, "h": 3600.0})


def parse_go_duration(value: Any) -> float:
    """A Go ``time.Duration`` as the toolkit's YAML takes it (``1s``, ``1m30s``,
    ``250ms``, ``0``, or an integer of nanoseconds), in seconds."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", "must be a duration like 1s")
    if isinstance(value, int):
        seconds = value / 1e9
    elif isinstance(value, str) and value == "0":
        seconds = 0.0
    elif isinstance(value, str) and value and _GO_DURATION_PART.sub("", value) == "":
        seconds = sum(float(n) * _GO_UNITS[u] for n, u in _GO_DURATION_PART.findall(value))
    else:
        raise PydanticCustomError("duration", "must be a duration like 1s")
    if seconds < 0:
        raise PydanticCustomError("duration", "must not be negative")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSServerConfig(_Strict):
    cert: str | None = None
    key: str | None = Field(default=None, repr=False)
    client_ca: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: ClientAuth = ""
    client_ca_file: str | None = None
    client_allowed_sans: list[str] | None = None
    min_version: TLSVersion = "TLS12"
    max_version: TLSVersion = "TLS13"
    cipher_suites: list[str] = Field(default_factory=list)
    curve_preferences: list[Curve] = Field(default_factory=list)
    prefer_server_cipher_suites: bool = True

    @property
    def enabled(self) -> bool:
        """As the toolkit's ``IsEnabled``: any certificate, key, CA or client
        auth type turns TLS on."""
        return any(
            (
                self.cert_file,
                self.cert,
                self.key_file,
                self.key,
                self.client_ca_file,
                self.client_ca,
                self.client_auth_type,
            )
        )

    @property
    def verifies_clients(self) -> bool:
        return self.client_auth_type not in ("", "NoClientCert")


class HTTPServerConfig(_Strict):
    http2: bool = Field(
        default=True, description="accepted; aiohttp serves HTTP/1.1 only, so it changes nothing"
    )
    headers: dict[str, str] = Field(default_factory=dict)


class RateLimitConfig(_Strict):
    interval: Annotated[float, BeforeValidator(parse_go_duration)] = 0.0
    burst: int = 0


class WebConfig(_Strict):
    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig | None = None
    rate_limit: RateLimitConfig | None = None
    basic_auth_users: dict[str, str] = Field(default_factory=dict)

    @property
    def tls(self) -> TLSServerConfig | None:
        """The TLS settings, if they turn TLS on."""
        tls = self.tls_server_config
        return tls if tls is not None and tls.enabled else None


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web config file; raise ConfigError listing every problem
    (each line starts with the file's name)."""
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
        raise ConfigError([f"{origin}: {loc}: {msg}" for loc, msg in describe_errors(exc)]) from exc
    errors = [f"{origin}: {problem}" for problem in web_config_problems(config, Path(path).parent)]
    if errors:
        raise ConfigError(errors)
    return config


def web_config_problems(config: WebConfig, base_dir: Path | None = None) -> list[str]:
    """What is wrong with a parsed web config, as ``field: problem`` lines."""
    errors = []
    for user, hashed in config.basic_auth_users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            errors.append(f"basic_auth_users.{user}: must be a bcrypt hash")
    if config.http_server_config is not None:
        for name, value in config.http_server_config.headers.items():
            if name not in ALLOWED_HEADERS:
                errors.append(
                    f"http_server_config.headers.{name}: not allowed "
                    f"(allowed: {', '.join(sorted(ALLOWED_HEADERS))})"
                )
                continue
            values = ALLOWED_HEADERS[name]
            if values is not None and value not in values:
                errors.append(
                    f"http_server_config.headers.{name}: must be one of "
                    f"{', '.join(values)}, not {value[:100]!r}"
                )
    limit = config.rate_limit
    if limit is not None and limit.interval > 0 and limit.burst < 1:
        errors.append("rate_limit.burst: must be at least 1 when an interval is set")
    tls = config.tls
    if tls is not None:
        errors += _tls_problems(tls, base_dir)
    return errors


def _tls_problems(tls: TLSServerConfig, base_dir: Path | None) -> list[str]:
    where = "tls_server_config"
    errors = []
    if not (tls.cert_file or tls.cert):
        errors.append(f"{where}: missing one of cert or cert_file")
    if not (tls.key_file or tls.key):
        errors.append(f"{where}: missing one of key or key_file")
    has_ca = bool(tls.client_ca_file or tls.client_ca)
    if has_ca and not tls.verifies_clients:
        errors.append(
            f"{where}.client_auth_type: client CAs are configured without a client auth "
            "policy (set one, like RequireAndVerifyClientCert)"
        )
    if tls.verifies_clients and not has_ca:
        errors.append(
            f"{where}.client_ca_file: required for client_auth_type {tls.client_auth_type} "
            "(or client_ca)"
        )
    if tls.client_allowed_sans is not None and not tls.verifies_clients:
        errors.append(
            f"{where}.client_allowed_sans: needs a client_auth_type that asks for client "
            "certificates"
        )
    if _TLS_VERSIONS[tls.min_version] > _TLS_VERSIONS[tls.max_version]:
        errors.append(f"{where}.max_version: {tls.max_version} is below min_version")
    for n, name in enumerate(tls.cipher_suites):
        if name not in _CIPHERS and name not in _TLS13_CIPHERS:
            errors.append(
                f"{where}.cipher_suites[{n}]: unknown cipher {name[:100]!r} (the names of "
                "Go's tls.CipherSuites(), like TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)"
            )
    if len(tls.curve_preferences) > 1:
        errors.append(
            f"{where}.curve_preferences: Python's ssl offers one curve only "
            "(SSLContext.set_ecdh_curve); list one, or none for OpenSSL's defaults"
        )
    if not errors:
        try:
            build_ssl_context(tls, base_dir)
        except ValueError as exc:
            errors.append(f"{where}.{exc}")
        except (OSError, ssl.SSLError) as exc:
            errors.append(f"{where}: cannot load certificates: {exc}")
    return errors


def build_ssl_context(tls: TLSServerConfig, base_dir: Path | None = None) -> ssl.SSLContext:
    """A server SSLContext doing what ``tls`` says; ValueError("field: problem")
    where this Python's OpenSSL cannot."""
    # Not create_default_context(): that would trust the system's CAs for
    # client certificates; only the configured client CAs are trusted.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    configure_ssl_context(context, tls, base_dir)
    return context


def _resolve(name: str, base_dir: Path | None) -> Path:
    file = Path(name)
    return base_dir / file if base_dir is not None and not file.is_absolute() else file


def configure_ssl_context(
    context: ssl.SSLContext, tls: TLSServerConfig, base_dir: Path | None = None
) -> None:
    """Apply ``tls`` to ``context``, which may be serving already: new
    connections get the new certificate and settings, so a reload rotates a
    certificate without a restart. Client CAs can be added to a running
    context, not removed (see :func:`dropped_client_cas`)."""
    context.minimum_version = _TLS_VERSIONS[tls.min_version]
    context.maximum_version = _TLS_VERSIONS[tls.max_version]
    # A file wins over inline text, as in the toolkit. Inline PEM goes
    # through a private temporary file: load_cert_chain reads files only.
    with tempfile.TemporaryDirectory(prefix="web-config-") as private:
        files = []
        for name, text, kind in ((tls.cert_file, tls.cert, "cert"), (tls.key_file, tls.key, "key")):
            if name:
                files.append(str(_resolve(name, base_dir)))
                continue
            inline = Path(private) / f"{kind}.pem"
            inline.touch(mode=0o600)
            inline.write_text(text or "", encoding="utf-8")
            files.append(str(inline))
        context.load_cert_chain(files[0], files[1])
    if tls.client_ca_file:
        context.load_verify_locations(str(_resolve(tls.client_ca_file, base_dir)))
    elif tls.client_ca:
        context.load_verify_locations(cadata=tls.client_ca)
    # Python's ssl verifies any certificate it is given, so "request" and
    # "verify if given" are the same here, as are the "require" types.
    if tls.client_auth_type in (
        "RequireAnyClientCert",
        "RequireClientCert",
        "RequireAndVerifyClientCert",
    ):
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.client_auth_type in ("RequestClientCert", "VerifyClientCertIfGiven"):
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    wanted = [_CIPHERS[name] for name in tls.cipher_suites if name in _CIPHERS]
    if wanted:
        try:
            context.set_ciphers(":".join(wanted))
        except ssl.SSLError:
            raise ValueError(
                "cipher_suites: none of these ciphers is available in this Python's "
                f"OpenSSL ({ssl.OPENSSL_VERSION})"
            ) from None
        offered = {cipher["name"] for cipher in context.get_ciphers()}
        missing = [go for go in tls.cipher_suites if go in _CIPHERS and _CIPHERS[go] not in offered]
        if missing:
            raise ValueError(
                f"cipher_suites: not available in this Python's OpenSSL "
                f"({ssl.OPENSSL_VERSION}): {', '.join(missing)}"
            )
    if tls.curve_preferences:
        try:
            context.set_ecdh_curve(_CURVES[tls.curve_preferences[0]])
        except (ValueError, ssl.SSLError):
            raise ValueError(
                f"curve_preferences: {tls.curve_preferences[0]} is not available in this "
                "Python's OpenSSL"
            ) from None


def dropped_client_cas(
    context: ssl.SSLContext, tls: TLSServerConfig, base_dir: Path | None = None
) -> int:
    """How many CAs ``context`` trusts that ``tls`` no longer lists."""
    try:
        if tls.client_ca_file:
            text = _resolve(tls.client_ca_file, base_dir).read_text(encoding="utf-8")
        else:
            text = tls.client_ca or ""
    except OSError:
        return 0
    end = "-----END CERTIFICATE-----"
    listed = {
        ssl.PEM_cert_to_DER_cert(block[block.index("-----BEGIN CERTIFICATE-----") :] + end + "\n")
        for block in text.split(end)
        if "-----BEGIN CERTIFICATE-----" in block
    }
    trusted = context.get_ca_certs(binary_form=True)
    return sum(1 for der in trusted if der not in listed)


def allowed_san(peercert: Any, allowed: list[str]) -> bool:
    """As the toolkit: does the client certificate carry a DNS, IP, e-mail or
    URI subject alternative name listed exactly in ``client_allowed_sans``?"""
    if not isinstance(peercert, dict):
        return False
    wanted = {_canonical_ip(value) for value in allowed}
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "IP Address":
            value = _canonical_ip(value)
        if kind in ("DNS", "IP Address", "email", "URI") and value in wanted:
            return True
    return False


def _canonical_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


class TokenBucket:
    """``rate_limit``: a token every ``interval`` seconds, at most ``burst``
    kept, starting full: Go's ``rate.NewLimiter(rate.Every(interval), burst)``."""

    def __init__(
        self, interval: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) / self.interval)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


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
                self._pool, _paced_check, password, target
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


def _paced_check(password: bytes, hashed: bytes) -> bool:
    """bcrypt, then a rest as long as the check took: under a flood of
    guesses the password thread keeps at most half a core busy."""
    started = time.perf_counter()
    try:
        return bcrypt.checkpw(password, hashed)
    finally:
        time.sleep((time.perf_counter() - started) * BCRYPT_REST)


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


class WebSecurity:
    """The web config in force (basic auth, headers, rate limit, allowed
    client SANs), replaced as a whole by :meth:`apply` on a reload."""

    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self.auth = BasicAuth(config.basic_auth_users) if config.basic_auth_users else None
        self.limiter = _limiter(config)

    @classmethod
    async def prepare(cls, config: WebConfig) -> WebSecurity:
        """Built in a thread: a BasicAuth hashes its dummy password at the users' cost."""
        return await asyncio.to_thread(cls, config)

    def apply(self, new: WebSecurity) -> None:
        """Take ``new``'s settings; unchanged users keep their password cache,
        an unchanged rate limit its tokens."""
        if new.config.basic_auth_users == self.config.basic_auth_users:
            if new.auth is not None:
                new.auth.close()
        else:
            old, self.auth = self.auth, new.auth
            if old is not None:
                old.close()
        if new.config.rate_limit != self.config.rate_limit:
            self.limiter = new.limiter
        self.config = new.config

    def middlewares(self, bypass: Callable[[web.Request], bool] | None = None) -> list[Middleware]:
        """A request for which ``bypass`` is true needs no basic auth (the
        API's own bearer token, see ``exporter.api.bearer_passes``)."""

        @web.middleware
        async def protect(request: web.Request, handler: Handler) -> web.StreamResponse:
            config = self.config
            # As the toolkit: the rate limit first, then headers and auth.
            if self.limiter is not None and not self.limiter.allow():
                return web.Response(status=429, text="Too Many Requests\n")
            response = await self._refusal(request, config, bypass)
            if response is None:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    response = exc
            if config.http_server_config is not None:
                for name, value in config.http_server_config.headers.items():
                    response.headers[name] = value
            return response

        return [protect]

    async def _refusal(
        self,
        request: web.Request,
        config: WebConfig,
        bypass: Callable[[web.Request], bool] | None,
    ) -> web.StreamResponse | None:
        """The answer refusing ``request``, or None to serve it."""
        tls = config.tls
        if tls is not None and tls.client_allowed_sans is not None:
            transport = request.transport
            peercert = transport.get_extra_info("peercert") if transport is not None else None
            if not allowed_san(peercert, tls.client_allowed_sans):
                # The toolkit ends the handshake; Python's ssl has no hook for
                # that, so the request is refused and the connection closed.
                refused = web.Response(status=403, text="client certificate has no allowed SAN\n")
                refused.force_close()
                return refused
        auth = self.auth
        if auth is None or (bypass is not None and bypass(request)):
            return None
        try:
            passed = await auth.check(request.headers.get("Authorization"))
        except PasswordChecksBusy:
            return web.Response(
                status=429,
                text="Too many password checks waiting; retry later\n",
                headers={"Retry-After": "1"},
            )
        if passed:
            return None
        return web.Response(
            status=401,
            text="Unauthorized\n",
            headers={"WWW-Authenticate": 'Basic realm="import-status-exporter"'},
        )


def _limiter(config: WebConfig) -> TokenBucket | None:
    limit = config.rate_limit
    if limit is None or limit.interval <= 0:
        return None
    return TokenBucket(limit.interval, limit.burst)


def security_middlewares(
    config: WebConfig | WebSecurity, bypass: Callable[[web.Request], bool] | None = None
) -> list[Middleware]:
    """aiohttp middlewares applying the web config to every endpoint."""
    security = config if isinstance(config, WebSecurity) else WebSecurity(config)
    return security.middlewares(bypass)


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(a.encode(), b.encode())
