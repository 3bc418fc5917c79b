"""``import-status-exporter track|untrack``: register imports from a pipeline.

A small client of the registration API (``exporter.api``) on the standard
library only, so a pipeline step needs nothing but this package::

    import-status-exporter track --source elevate-prod --id 5537431447739019570 \\
        --name "nightly catalogue" --url http://exporter:10451 --token-file /run/token
    import-status-exporter untrack --source elevate-prod --id 5537431447739019570
    import-status-exporter list --source elevate-prod --state failed

``list`` prints one tab-separated line per tracked import (source, id, state,
name), following the API's pages to the end.

Exit status: 0 done (one line on stdout), 1 the exporter said no or could not
be reached (its error on stderr), 2 a usage error. The token comes from
``--token-file`` or the environment variable ``IMPORT_STATUS_EXPORTER_TOKEN``
and is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from urllib.parse import quote, urlencode

from exporter import __version__

DEFAULT_URL = "http://localhost:10451"
TOKEN_ENV = "IMPORT_STATUS_EXPORTER_TOKEN"
PROG = "import-status-exporter"


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tell a running exporter to start or stop tracking an import, or list them.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    track = commands.add_parser("track", help="start tracking an import")
    untrack = commands.add_parser("untrack", help="stop tracking an import")
    listing = commands.add_parser("list", help="list tracked imports (source, id, state, name)")
    for sub in (track, untrack):
        sub.add_argument("--source", required=True, help="the source's name in the config")
        sub.add_argument(
            "--id", required=True, dest="import_id", metavar="ID", help="the upstream's import id"
        )
    listing.add_argument("--source", help="only this source's imports")
    listing.add_argument("--state", help="only imports in this state")
    listing.add_argument(
        "--page-size", type=int, default=None, help="imports asked for per request (1-5000)"
    )
    for sub in (track, untrack, listing):
        sub.add_argument(
            "--url", default=DEFAULT_URL, help=f"the exporter's base URL (default {DEFAULT_URL})"
        )
        sub.add_argument(
            "--token-file",
            help=f"file holding the bearer token (default: the {TOKEN_ENV} environment variable)",
        )
        sub.add_argument("--ca-file", help="CA certificate(s) to verify an https exporter with")
        sub.add_argument("--cert-file", help="client certificate, when the exporter asks for one")
        sub.add_argument("--key-file", help="the client certificate's key")
        sub.add_argument(
            "--timeout", type=float, default=10.0, help="seconds to wait for the exporter"
        )
    track.add_argument("--name", help="a name for the import (the `name` label)")
    return parser


def read_token(path: str | None) -> str | None:
    """The first non-empty, non-comment line of the token file, else the env variable."""
    if path is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                token = line.strip()
                if token and not token.startswith("#"):
                    return token
    except OSError as exc:
        raise UsageError(f"--token-file: cannot read {path}: {exc.strerror or exc}") from exc
    raise UsageError(f"--token-file: {path} holds no token")


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.url.startswith("https://"):
        if args.ca_file or args.cert_file:
            raise UsageError("--ca-file and --cert-file need an https:// --url")
        return None
    try:
        context = ssl.create_default_context(cafile=args.ca_file)
        if args.cert_file:
            context.load_cert_chain(args.cert_file, args.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the certificates: {exc}") from exc
    return context


def _base_and_headers(args: argparse.Namespace, token: str | None) -> tuple[str, dict[str, str]]:
    base = args.url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"--url {args.url!r}: expected http://host:port or https://host:port")
    headers = {"User-Agent": f"{PROG}/{__version__}", "Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return base, headers


def build_request(args: argparse.Namespace, token: str | None) -> urllib.request.Request:
    base, headers = _base_and_headers(args, token)
    if args.command == "track":
        body: dict[str, str] = {"source": args.source, "id": args.import_id}
        if args.name is not None:
            body["name"] = args.name
        headers["Content-Type"] = "application/json"
        return urllib.request.Request(
            f"{base}/api/v1/imports", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
    path = f"{quote(args.source, safe='')}/{quote(args.import_id, safe='')}"
    return urllib.request.Request(f"{base}/api/v1/imports/{path}", headers=headers, method="DELETE")


def list_imports(
    args: argparse.Namespace, token: str | None, context: ssl.SSLContext | None
) -> int:
    """Print every tracked import the filters match, page after page."""
    base, headers = _base_and_headers(args, token)
    if args.page_size is not None and not 1 <= args.page_size <= 5000:
        raise UsageError("--page-size: must be from 1 to 5000")
    params = {
        key: value
        for key, value in (
            ("source", args.source),
            ("state", args.state),
            ("limit", None if args.page_size is None else str(args.page_size)),
        )
        if value is not None
    }
    while True:
        request = urllib.request.Request(
            f"{base}/api/v1/imports?{urlencode(params)}", headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=args.timeout, context=context) as answer:
                page = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            with exc:
                message = _server_error(exc.code, exc.read(64 * 1024))
            print(f"{PROG}: list: {message}", file=sys.stderr)
            return 1
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            print(f"{PROG}: cannot list from {args.url}: {reason}", file=sys.stderr)
            return 1
        for item in page["imports"]:
            fields = [item["source"], item["id"], item["state"] or "pending", item["name"] or ""]
            print("\t".join(fields))
        if page.get("next") is None:
            return 0
        params["after"] = page["next"]


def _server_error(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return f"{status}: {data['error']}"
    text = body.decode("utf-8", "replace").strip()[:200]
    return f"{status}: {text}" if text else f"HTTP {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        token = read_token(args.token_file)
        context = ssl_context(args)
        if args.command == "list":
            return list_imports(args, token, context)
        request = build_request(args, token)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    target = f"{args.source}/{args.import_id}"
    try:
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        with exc:
            message = _server_error(exc.code, exc.read(64 * 1024))
        print(f"{PROG}: {args.command} {target}: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"{PROG}: cannot reach {args.url}: {reason}", file=sys.stderr)
        return 1
    if status == 201:
        print(f"tracking {target} (new)")
    elif status == 200:
        print(f"tracking {target} (already tracked)")
    elif status == 204:
        print(f"stopped tracking {target}")
    else:
        print(f"{PROG}: {args.command} {target}: unexpected HTTP {status}", file=sys.stderr)
        return 1
    return 0
