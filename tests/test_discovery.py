"""Discovery: an http_json source lists its upstream's jobs (paged, filtered)
and the exporter tracks what it finds (origin ``discovered``, persisted);
a failed discovery is counted and shown and drops nothing found before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.config.loader import parse_config_data
from exporter.model import ErrorReason, Origin, ParseError, State
from exporter.poller import MAX_START_SPREAD
from exporter.runtime import Exporter
from exporter.sources.http_json import HttpJsonSource
from exporter.sources.registry import build_source
from tests.conftest import wait_until
from tests.test_source_adapters import ServerFactory, json_response, serve

JOBS = [
    {"id": "750A", "object": "Account", "state": "InProgress"},
    {"id": "750B", "object": "Contact", "state": "JobComplete"},  # filtered out
    {"id": "750C", "object": "Account", "state": "JobComplete"},
    {"id": "750D", "object": "Account", "state": "Open"},
    {"id": "../x", "object": "Account", "state": "Open"},  # no usable id: skipped
    {"object": "Account", "state": "Open"},  # no id: skipped
]


class JobApi:
    """A Salesforce-like job API: a list paged by nextRecordsUrl, and each job."""

    def __init__(self) -> None:
        self.list_status = 200
        self.list_calls = 0

    async def listing(self, request: web.Request) -> web.Response:
        self.list_calls += 1
        if self.list_status != 200:
            return json_response([{"errorCode": "SERVER_ERROR"}], self.list_status)
        page = int(request.query.get("page", "0"))
        records = JOBS[page * 3 : page * 3 + 3]
        done = page * 3 + 3 >= len(JOBS)
        body: dict[str, Any] = {"done": done, "records": records}
        if not done:
            body["nextRecordsUrl"] = f"/jobs?page={page + 1}"
        return json_response(body)

    async def job(self, request: web.Request) -> web.Response:
        found = [job for job in JOBS if job.get("id") == request.match_info["id"]]
        if not found:
            return json_response([{"errorCode": "NOT_FOUND"}], 404)
        return json_response(found[0])

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/jobs", self.listing), web.get("/jobs/{id}", self.job)]


def settings(url: str, **discovery: Any) -> dict[str, Any]:
    return {
        "name": "jobs",
        "type": "http_json",
        "system": "acme",
        "url": url,
        "timeout": "1s",
        "interval": "1h",
        "request": {"path": "/jobs/{id}"},
        "extract": {"state": "state"},
        "states": {"InProgress": "running", "JobComplete": "succeeded", "Open": "waiting"},
        "not_found": {"status": [404]},
        "discovery": {
            "interval": "1h",
            "request": {"path": "/jobs", "query": {"jobType": "V2Ingest"}},
            "items": "records",
            "id": "id",
            "name": "join(' ', [object, 'job'])",
            "filter": "object == 'Account'",
            "next": "done == `false` && nextRecordsUrl || null",
            **discovery,
        },
    }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def build(config: dict[str, Any], session: aiohttp.ClientSession) -> HttpJsonSource:
    source = build_source(parse_config_data({"sources": [config]}, "c.yaml").sources[0], session)
    assert isinstance(source, HttpJsonSource)
    return source


async def test_discover_follows_pages_filters_and_names(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    api = JobApi()
    url = await serve(aiohttp_server, api.routes())
    source = build(settings(url), session)
    assert source.discovery_interval == 3600
    found = await source.discover()
    assert [(spec.id, spec.name) for spec in found] == [
        ("750A", "Account job"),
        ("750C", "Account job"),
        ("750D", "Account job"),
    ]
    assert api.list_calls == 2
    capped = build(settings(url, max_pages=1), session)
    assert [spec.id for spec in await capped.discover()] == ["750A", "750C"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"next": "'http://elsewhere.example/jobs?page=1'"}, "the next page is on another host"),
        ({"items": "done"}, "items is not a list"),
    ],
)
async def test_discovery_answers_that_make_no_sense(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    change: dict[str, Any],
    message: str,
) -> None:
    url = await serve(aiohttp_server, JobApi().routes())
    with pytest.raises(ParseError, match=message):
        await build(settings(url, **change), session).discover()


def test_discovery_config_errors_name_their_location() -> None:
    from exporter.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config_data({"sources": [settings("http://x", items="[")]}, "c.yaml")
    assert caught.value.errors[0].startswith("c.yaml: sources[0].discovery.items: invalid JMESPath")


async def test_the_exporter_tracks_what_discovery_finds_and_keeps_it(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    api = JobApi()
    url = await serve(aiohttp_server, api.routes())
    config = parse_config_data({"sources": [settings(url)]}, "c.yaml")
    storage = str(tmp_path / "state.db")
    exporter = Exporter(config, "127.0.0.1:0", storage_path=storage)
    await exporter.start()
    try:
        state = exporter.state

        def polled() -> bool:
            keys = [("jobs", i) for i in ("750A", "750C", "750D")]
            return all(k in state.imports and state.imports[k].state is not None for k in keys)

        # A found import's first poll comes within the start spread (up to 5 s).
        await wait_until(
            polled, timeout=MAX_START_SPREAD + 10, what="the discovered imports to be polled"
        )
        assert sorted(i for s, i in state.imports if s == "jobs") == ["750A", "750C", "750D"]
        record = state.imports[("jobs", "750C")]
        assert (record.origin, record.name, record.state) == (
            Origin.DISCOVERED,
            "Account job",
            State.SUCCEEDED,
        )
        # A failing discovery is counted and shown; nothing found is dropped.
        api.list_status = 500
        assert await exporter.discoverers["jobs"].run_once() == 0
        source = state.sources["jobs"]
        assert source.errors_total[ErrorReason.SERVER_ERROR] == 1
        assert (source.last_error or "").startswith("server_error: discovery: ")
        assert len([k for k in state.imports if k[0] == "jobs"]) == 3
        # Forgotten through the API: not found again while the upstream lists it.
        await exporter.unregister("jobs", "750D")
        api.list_status = 200
        assert await exporter.discoverers["jobs"].run_once() == 0
        assert ("jobs", "750D") not in state.imports
    finally:
        await exporter.stop()
    # Persisted: a restart knows them (and their origin) before discovering.
    api.list_status = 500
    again = Exporter(config, "127.0.0.1:0", storage_path=storage)
    await again.start()
    try:
        restored = again.state.imports[("jobs", "750A")]
        assert restored.origin is Origin.DISCOVERED
        assert ("jobs", "750D") not in again.state.imports
    finally:
        await again.stop()


async def test_a_source_without_discovery_lists_nothing(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    url = await serve(aiohttp_server, JobApi().routes())
    plain = settings(url)
    del plain["discovery"]
    source = build(plain, session)
    assert source.discovery_interval is None
    assert await source.discover() == []


PAGES = (("1", "2"), ("3",), ("4", "5"))


class PagedApi:
    """Lists of ids paged by number, by a cursor in the query, and by a
    cursor in a GraphQL body's variables."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def numbered(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.query))
        number = int(request.query["page"])
        items: tuple[str, ...] = PAGES[number - 1] if number <= len(PAGES) else ()
        return json_response({"items": [{"id": i} for i in items]})

    def _page(self, cursor: str | None) -> tuple[tuple[str, ...], str | None]:
        index = int(cursor[1:]) if cursor else 0
        following = f"c{index + 1}" if index + 1 < len(PAGES) else None
        return PAGES[index], following

    async def cursored(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.query))
        items, following = self._page(request.query.get("after"))
        return json_response({"jobs": [{"id": i} for i in items], "next": following})

    async def graphql(self, request: web.Request) -> web.Response:
        variables = (await request.json())["variables"]
        self.seen.append(variables)
        items, following = self._page(variables["after"])
        connection = {
            "nodes": [{"id": i} for i in items],
            "pageInfo": {"hasNextPage": following is not None, "endCursor": following or "end"},
        }
        return json_response({"data": {"jobs": connection}})

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/numbered", self.numbered),
            web.get("/cursored", self.cursored),
            web.post("/graphql", self.graphql),
        ]


def paged(url: str, discovery: dict[str, Any]) -> dict[str, Any]:
    config = settings(url)
    config["discovery"] = {"id": "id", **discovery}
    return config


async def test_paging_by_number_and_by_cursor(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    api = PagedApi()
    url = await serve(aiohttp_server, api.routes())
    numbered = paged(
        url, {"request": {"path": "/numbered"}, "items": "items", "page_param": "page"}
    )
    assert [s.id for s in await build(numbered, session).discover()] == ["1", "2", "3", "4", "5"]
    assert [q["page"] for q in api.seen] == ["1", "2", "3", "4"]  # until a page lists nothing
    api.seen.clear()
    cursored = paged(
        url,
        {
            "request": {"path": "/cursored", "query": {"after": "{cursor}", "limit": "2"}},
            "items": "jobs",
            "cursor": "next",
        },
    )
    assert [s.id for s in await build(cursored, session).discover()] == ["1", "2", "3", "4", "5"]
    assert api.seen == [
        {"limit": "2"},
        {"after": "c1", "limit": "2"},
        {"after": "c2", "limit": "2"},
    ]
    api.seen.clear()
    query = "query($after: String) { jobs(first: 2, after: $after) { nodes { id } } }"
    graphql = paged(
        url,
        {
            "request": {
                "method": "POST",
                "path": "/graphql",
                "body": {"query": query, "variables": {"after": "{cursor}"}},
            },
            "items": "data.jobs.nodes",
            "cursor": "data.jobs.pageInfo.hasNextPage && data.jobs.pageInfo.endCursor || null",
        },
    )
    assert [s.id for s in await build(graphql, session).discover()] == ["1", "2", "3", "4", "5"]
    assert api.seen == [{"after": None}, {"after": "c1"}, {"after": "c2"}]


def test_one_way_of_paging() -> None:
    from exporter.config import ConfigError

    config = paged("http://x", {"request": {}, "items": "a", "next": "n", "cursor": "c"})
    with pytest.raises(ConfigError) as caught:
        parse_config_data({"sources": [config]}, "c.yaml")
    assert caught.value.errors == [
        "c.yaml: sources[0].discovery: give at most one of next, cursor and page_param"
    ]
