"""TLS from the web config: the serving SSLContext (loaded again in place on
reload, so a rotated certificate needs no restart), and what Python's ``ssl``
cannot do refused with the field named."""

from __future__ import annotations

import ipaddress
import ssl
import tempfile
from pathlib import Path
from typing import Any

from exporter.webconfig.model import TLSServerConfig

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


def tls_problems(tls: TLSServerConfig, base_dir: Path | None) -> list[str]:
    where = "tls_server_config"
    errors = _client_auth_problems(tls, where)
    if not (tls.cert_file or tls.cert):
        errors.append(f"{where}: missing one of cert or cert_file")
    if not (tls.key_file or tls.key):
        errors.append(f"{where}: missing one of key or key_file")
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


def _client_auth_problems(tls: TLSServerConfig, where: str) -> list[str]:
    errors = []
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
    return errors


def build_ssl_context(tls: TLSServerConfig, base_dir: Path | None = None) -> ssl.SSLContext:
    """A server SSLContext doing what ``tls`` says; ValueError("field: problem")
    where this Python's OpenSSL cannot."""
    # Not create_default_context(): that would trust the system's CAs for
    # client certificates; only the configured client CAs are trusted.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    configure_ssl_context(context, tls, base_dir)
    return context


# Python's ssl verifies any certificate it is given, so "request" and "verify
# if given" are the same here, as are the "require" types.
_VERIFY_MODES = {
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
}


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
    context.verify_mode = _VERIFY_MODES.get(tls.client_auth_type, ssl.CERT_NONE)
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
