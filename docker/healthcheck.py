#!/usr/bin/env python3
"""The container's health check: is the exporter (PID 1) answering HTTP?

It reads the port from the exporter's own command line (--web.listen-address,
so `docker run image --web.listen-address=:9999` needs no change here; the
same for --web.route-prefix and --web.external-url), asks
/-/healthy over plain HTTP, and over TLS when the exporter serves TLS
(--web.config.file). Any HTTP answer below 500 counts: with basic auth on,
401 proves the server answers as well as 200 does. Exit 0 healthy, 1 not.

    healthcheck.py [--pid N]   # the exporter's process (default 1)
    HEALTHCHECK_URL=https://127.0.0.1:10451/-/healthy healthcheck.py  # force a URL
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
from urllib.parse import urlsplit

DEFAULT_PORT = 10451
TIMEOUT = 4.0


def flag(args: list[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def listen_address(pid: int) -> tuple[str, int, str]:
    """Host, port and route prefix of the exporter running as ``pid``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            args = [a.decode() for a in file.read().split(b"\0") if a]
    except OSError:
        args = []
    address = flag(args, "--web.listen-address") or f":{DEFAULT_PORT}"
    prefix = flag(args, "--web.route-prefix")
    if prefix is None:
        external = flag(args, "--web.external-url") or ""
        prefix = urlsplit(external).path if external else ""
    prefix = prefix.strip().strip("/")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port), f"/{prefix}" if prefix else ""


def answers(connection: http.client.HTTPConnection, path: str) -> bool:
    try:
        connection.request("GET", path)
        return connection.getresponse().status < 500
    finally:
        connection.close()


def check(host: str, port: int, path: str = "/-/healthy", tls: bool | None = None) -> bool:
    # Loopback only: the certificate names the public host, not 127.0.0.1.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    attempts = [False, True] if tls is None else [tls]
    for use_tls in attempts:
        connection = (
            http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)
            if use_tls
            else http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        )
        try:
            if answers(connection, path):
                return True
        except ConnectionRefusedError:
            return False
        except (OSError, http.client.HTTPException):
            continue  # a TLS server answers plain HTTP with garbage or a reset
    return False


def main(argv: list[str]) -> int:
    url = os.environ.get("HEALTHCHECK_URL")
    if url:
        scheme, _, rest = url.partition("://")
        netloc, _, path = rest.partition("/")
        host, _, port = netloc.rpartition(":")
        return 0 if check(host.strip("[]"), int(port), "/" + path, scheme == "https") else 1
    pid = int(argv[argv.index("--pid") + 1]) if "--pid" in argv else 1
    host, port, prefix = listen_address(pid)
    return 0 if check(host, port, f"{prefix}/-/healthy") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
