"""Basic auth, response headers and the rate limit as aiohttp middlewares.

bcrypt checks are cached, and an unknown user costs one bcrypt check too, so
response times do not tell which user names exist. Checks run on their own
small worker pool with a bounded queue: a client guessing passwords gets 429
once the queue is full and never delays cached credentials, renders of
/metrics or store writes (which use the default executor)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Middleware

from exporter.webconfig.model import WebConfig
from exporter.webconfig.tls import allowed_san

_CACHE_SIZE = 1024
BCRYPT_WORKERS = 1
"""Threads checking passwords: one leaves the other cores to the event loop,
renders and polls however many wrong passwords arrive."""
BCRYPT_REST = 1.0
"""After each check the password thread rests this many times as long."""
BCRYPT_MAX_PENDING = 8
"""Distinct uncached checks running or queued at once; more answer 429 at once."""


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
