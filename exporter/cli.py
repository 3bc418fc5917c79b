"""Command line: flags in the Prometheus exporter style, and the run loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from multidict import CIMultiDict, CIMultiDictProxy

from exporter import __version__
from exporter.config import Config, ConfigError
from exporter.config.loader import ConfigApart, load_config
from exporter.hup import catch_early, take_early
from exporter.limits import raise_open_file_limit
from exporter.logs import LEVELS, setup_logging
from exporter.model import SourceError
from exporter.runtime import (
    DEFAULT_MAX_REQUESTS,
    DEFAULT_PORT,
    HEADER_READ_TIMEOUT,
    Exporter,
    ListenError,
    Restored,
    parse_listen_address,
    restore_while_config_parses,
)
from exporter.sharding import WHOLE, Shard, ordinal_of
from exporter.sources.base import HttpResponse
from exporter.sources.http_json import Extractor, HttpJsonConfig
from exporter.storage import StoreError
from exporter.storage.postgres import open_when_reachable
from exporter.web import route_prefix_of

log = logging.getLogger("exporter")

DEFAULT_STORAGE_PATH = "import-status.db"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="import-status-exporter",
        description="Prometheus exporter for the status of long-running SaaS data imports.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""pipeline commands (a client of the registration API, see <command> --help):
  track     start tracking an import:  track --source S --id ID [--name N] [--url URL]
  untrack   stop tracking an import:   untrack --source S --id ID [--url URL]
  list      list tracked imports:      list [--source S] [--state STATE] [--url URL]""",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "check-config"],
        default="run",
        help="run the exporter (default) or only validate the config file",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        default=os.environ.get("IMPORT_STATUS_EXPORTER_CONFIG_FILE", "config.yaml"),
        help="config file (YAML; default $IMPORT_STATUS_EXPORTER_CONFIG_FILE, else config.yaml)",
    )
    parser.add_argument(
        "--config.expand-env",
        dest="expand_env",
        action="store_true",
        help="replace ${VAR} and ${VAR:-default} in the config file by environment "
        "variables before parsing it (an unset variable without default is an error)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=f":{DEFAULT_PORT}",
        help=f"address to serve /metrics and pages on (default :{DEFAULT_PORT})",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        help="TLS and basic auth config, in the Prometheus exporter-toolkit format",
    )
    parser.add_argument(
        "--storage.path",
        dest="storage_path",
        default=os.environ.get("IMPORT_STATUS_EXPORTER_STORAGE_PATH") or None,
        help=f"SQLite file keeping registrations and import state across restarts "
        f"(default: $IMPORT_STATUS_EXPORTER_STORAGE_PATH, else storage.path of the config "
        f"file, else {DEFAULT_STORAGE_PATH}; "
        "with --demo: none, state is kept in memory only)",
    )
    parser.add_argument(
        "--storage.url",
        dest="storage_url",
        default=os.environ.get("IMPORT_STATUS_EXPORTER_STORAGE_URL") or None,
        help="postgresql://user:password@host/db: a PostgreSQL database shared by replicas, "
        "instead of the SQLite file (default: $IMPORT_STATUS_EXPORTER_STORAGE_URL, else "
        "storage.url of the config file; a URL from either wins over any storage path; "
        "prefer those, or storage.url_file, to keep the password out of the process list)",
    )
    parser.add_argument(
        "--web.max-requests",
        dest="max_requests",
        type=int,
        default=DEFAULT_MAX_REQUESTS,
        help=f"requests served at once, beyond which 503 (0: no limit; default "
        f"{DEFAULT_MAX_REQUESTS}; /-/healthy and /-/ready are exempt)",
    )
    parser.add_argument(
        "--web.read-header-timeout",
        dest="header_timeout",
        type=float,
        default=HEADER_READ_TIMEOUT,
        help=f"seconds a connection may take to send a request's headers, and stay idle "
        f"between requests (default {HEADER_READ_TIMEOUT:g})",
    )
    parser.add_argument(
        "--web.external-url",
        dest="external_url",
        default=None,
        help="the URL under which the exporter is reached from outside (behind a reverse "
        "proxy); its path is the default of --web.route-prefix",
    )
    parser.add_argument(
        "--web.route-prefix",
        dest="route_prefix",
        default=None,
        help="path prefix of every endpoint (e.g. /import-status); default: the path of "
        "--web.external-url, else /",
    )
    parser.add_argument(
        "--shard",
        type=int,
        default=None,
        help="this process's shard, 0 to --total-shards - 1: it polls and exports only the "
        "imports it owns (by a stable hash of source and id)",
    )
    parser.add_argument(
        "--total-shards", dest="total_shards", type=int, default=1, help="how many shards (1)"
    )
    parser.add_argument(
        "--shard.from-hostname",
        dest="shard_from_hostname",
        action="store_true",
        help="take --shard from the host name's ordinal (a StatefulSet pod, import-status-2)",
    )
    parser.add_argument("--log.level", dest="log_level", choices=list(LEVELS), default="info")
    parser.add_argument(
        "--log.format", dest="log_format", choices=["logfmt", "json"], default="logfmt"
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config file and exit 0 or 1"
    )
    parser.add_argument(
        "--source",
        dest="answer_source",
        default=None,
        help="check-config: the http_json source whose extraction reads --answer",
    )
    parser.add_argument(
        "--answer",
        default=None,
        help="check-config: a saved upstream answer (JSON) to read as --source would, "
        "printing the observation",
    )
    parser.add_argument(
        "--answer.status",
        dest="answer_status",
        type=int,
        default=200,
        help="check-config: the HTTP status the saved answer came with (default 200)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run against the built-in simulator of the upstream APIs (no credentials needed)",
    )
    parser.add_argument(
        "--demo.speed",
        dest="demo_speed",
        type=float,
        default=1.0,
        help="how many times faster than real time the simulated imports move",
    )
    parser.add_argument(
        "--version", action="version", version=f"import-status-exporter {__version__}"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] in (["track"], ["untrack"], ["list"]):  # a pipeline's client of the API
        from exporter.client import main as client_main

        return client_main(given)
    catch_early()  # for the console script (python -m exporter did it already)
    args = build_parser().parse_args(argv)
    if args.command == "check-config" or args.check_config:
        if (args.answer_source is None) != (args.answer is None):
            print("--source and --answer go together", file=sys.stderr)
            return 2
        code = check_config(args.config_file, expand_env=args.expand_env)
        if code != 0 or args.answer is None:
            return code
        return check_answer(
            load_config(args.config_file, expand_env=args.expand_env),
            args.answer_source,
            args.answer,
            args.answer_status,
        )
    setup_logging(args.log_level, args.log_format)
    if args.max_requests < 0 or args.header_timeout <= 0:
        print("--web.max-requests must be >= 0 and --web.read-header-timeout > 0", file=sys.stderr)
        return 2
    try:
        shard = shard_of(args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    before, after = raise_open_file_limit()
    if after != before:
        log.info("raised the open file limit from %d to %d", before, after)
    try:
        parse_listen_address(args.listen_address)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args, shard))
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    except (StoreError, ListenError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def shard_of(args: argparse.Namespace) -> Shard:
    """--shard, --total-shards and --shard.from-hostname as a :class:`Shard`."""
    index = args.shard
    if args.shard_from_hostname:
        if index is not None:
            raise ValueError("give --shard or --shard.from-hostname, not both")
        index = ordinal_of(socket.gethostname())
    return Shard(index or 0, args.total_shards)


def check_config(path: str, *, expand_env: bool = False) -> int:
    try:
        config = load_config(path, expand_env=expand_env)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    for source in config.sources:
        for warning in source.deprecations():
            print(f"{path}: warning: source {source.name}: {warning}", file=sys.stderr)
    imports = sum(len(source.import_entries()) for source in config.sources)
    print(f"{path}: OK ({len(config.sources)} sources, {imports} configured imports)")
    return 0


def check_answer(config: Config, name: str, answer: str, status: int) -> int:
    """Read a saved answer with one http_json source's extraction and print
    the observation it makes (or the error), so a recipe can be built without
    a live server. Exit 0 for an observation, 1 otherwise."""
    source = next((s for s in config.sources if s.name == name), None)
    if source is None:
        print(f"no source named {name!r} in the config", file=sys.stderr)
        return 1
    if not isinstance(source, HttpJsonConfig):
        print(
            f"source {name} is of type {getattr(source, 'type', '?')}: "
            "--answer reads http_json sources only",
            file=sys.stderr,
        )
        return 1
    try:
        body = Path(answer).read_bytes()
    except OSError as exc:
        print(f"{answer}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    response = HttpResponse(status, CIMultiDictProxy(CIMultiDict()), body)
    try:
        observation = Extractor(source).parse(response)
    except SourceError as exc:
        print(
            f"{answer}: error {exc.reason.value}: {exc.message}"
            + (" (holds the whole source)" if exc.source_wide else "")
        )
        return 1
    print(f"{answer}: source {name} (system {source.system}) reads:")
    for field, value in observation._asdict().items():
        if value is None:
            continue
        if field in ("started_at", "ended_at"):
            when = datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")
            value = f"{when} ({value:.15g})"
        print(f"  {field}: {value}")
    return 0


def choose_storage(
    path: str | None, url: str | None, config: Config
) -> tuple[str | None, str | None]:
    """(SQLite path, PostgreSQL URL). A URL given anywhere (the command line
    first, else the config file) selects PostgreSQL: a storage path may come
    from an image's environment ($IMPORT_STATUS_EXPORTER_STORAGE_PATH) and must
    not hide the config's database. The path: the command line's, else the
    config's, else the default file."""
    return (path or config.storage_path() or DEFAULT_STORAGE_PATH), (url or config.storage_url())


def load_and_restore(
    args: argparse.Namespace,
) -> tuple[Config, str | None, str | None, Restored | None]:
    """The config; the storage chosen (SQLite path, PostgreSQL URL); and, if
    that is the existing SQLite file the command line names, the file
    restored. The config is parsed in a child (the parse's garbage stays out
    of this heap) while this process restores that file, on the other core:
    until the config is read, a file named on the command line is the store
    unless the config names a database."""
    parsing = ConfigApart(args.config_file, expand_env=args.expand_env)
    restored = None
    if args.storage_path is not None and args.storage_url is None:
        try:
            restored = restore_while_config_parses(args.storage_path)
        except BaseException:
            with contextlib.suppress(Exception):
                parsing.result()  # its child reaped
            raise
    try:
        config = parsing.result()
    except BaseException:
        if restored is not None:
            restored.close()
        raise
    storage_path, storage_url = choose_storage(args.storage_path, args.storage_url, config)
    if restored is not None and storage_url is not None:
        restored.close()  # the config names a database: not this file
        log.info("the config names a database: %s closed unused", args.storage_path)
        restored = None
    return config, storage_path, storage_url, restored


async def run(args: argparse.Namespace, shard: Shard = WHOLE) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP first of all: during start-up (loading a large store can take
    # seconds) it is remembered, and the reload runs once start-up is done.
    exporter: Exporter | None = None
    reload_asked = False
    reloads: set[asyncio.Task[list[str]]] = set()

    def reload() -> None:
        task = loop.create_task(exporter.reload()) if exporter is not None else None
        if task is not None:
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    def on_sighup() -> None:
        nonlocal reload_asked
        if exporter is None:
            if not reload_asked:
                log.info("reload asked for during start-up: it runs once start-up is done")
            reload_asked = True
        else:
            reload()

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if take_early():  # one that came before the loop took the signal over
        reload_asked = True
    async with contextlib.AsyncExitStack() as stack:
        config: Config
        loader = None
        storage_path: str | None = args.storage_path
        storage_url: str | None = args.storage_url
        restored: Restored | None = None
        if args.demo:
            from exporter.demo import start_demo_simulator

            config = await stack.enter_async_context(start_demo_simulator(args.demo_speed))
        else:
            # No cyclic GC until start-up is done (Exporter.start freezes what
            # it built, then enables it): with 100,000 imports, collections
            # walking the growing config and state again and again took
            # seconds of the start-up.
            gc.disable()
            config, storage_path, storage_url, restored = load_and_restore(args)

            def loader() -> Config:
                return load_config(args.config_file, expand_env=args.expand_env)

        store = await open_when_reachable(storage_url, stop)
        if stop.is_set():
            return 0  # stopped while waiting for the database
        starting = Exporter(
            config,
            args.listen_address,
            args.web_config_file,
            loader,
            storage_path=storage_path,
            store=store,
            restored=restored,
            max_requests=args.max_requests,
            header_timeout=args.header_timeout,
            shard=shard,
            route_prefix=(
                args.route_prefix
                if args.route_prefix is not None
                else route_prefix_of(args.external_url)
            ),
        )
        await starting.start()
        stack.push_async_callback(starting.stop)
        exporter = starting
        if reload_asked:
            reload()
        await stop.wait()
        log.info("shutting down")
    return 0
