"""The exporter-toolkit web config format: every key of the toolkit's
``web/tls_config.go``, with its rules (header allow-list and values)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

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

# The headers exporter-toolkit lets users set, with the values it allows
# (None: any value). Cache-Control is not among them.
ALLOWED_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

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
