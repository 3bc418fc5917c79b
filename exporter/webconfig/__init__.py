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

from exporter.webconfig.load import load_web_config, web_config_problems
from exporter.webconfig.model import RateLimitConfig, TLSServerConfig, WebConfig, parse_go_duration
from exporter.webconfig.security import (
    BasicAuth,
    PasswordChecksBusy,
    TokenBucket,
    WebSecurity,
    security_middlewares,
)
from exporter.webconfig.tls import (
    allowed_san,
    build_ssl_context,
    configure_ssl_context,
    dropped_client_cas,
)

__all__ = [
    "BasicAuth",
    "PasswordChecksBusy",
    "RateLimitConfig",
    "TLSServerConfig",
    "TokenBucket",
    "WebConfig",
    "WebSecurity",
    "allowed_san",
    "build_ssl_context",
    "configure_ssl_context",
    "dropped_client_cas",
    "load_web_config",
    "parse_go_duration",
    "security_middlewares",
    "web_config_problems",
]
