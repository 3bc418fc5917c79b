"""The pipeline's client (``import-status-exporter track|untrack|list``)
against a fake registration API on loopback: what it sends, prints and exits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exporter.client import main
from tests.conftest import free_port

ServerFactory = Callable[..., Awaitable[TestServer]]
TOKEN = "a-pipeline-token-0123456789"


class FakeApi:
    """Answers like the registration API and remembers what it was asked."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None, Any]] = []
        self.tracked = {("shop", "1001")}

    async def register(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(("POST", request.path, request.headers.get("Authorization"), body))
        if body["source"] == "full":
            return web.json_response({"error": "source 'full' tracks 10000 imports"}, status=409)
        key = (body["source"], body["id"])
        new = key not in self.tracked
        self.tracked.add(key)
        return web.json_response({}, status=201 if new else 200)

    async def delete(self, request: web.Request) -> web.Response:
        self.seen.append(("DELETE", request.raw_path, request.headers.get("Authorization"), None))
        return web.Response(status=204)

    async def listing(self, request: web.Request) -> web.Response:
        after = request.query.get("after")
        item = {"source": "shop", "state": "running", "name": None}
        if after is None:
            return web.json_response({"imports": [{**item, "id": "1"}], "next": "cursor-1"})
        return web.json_response({"imports": [{**item, "id": "2"}], "next": None})


@pytest.fixture
async def api(aiohttp_server: ServerFactory) -> tuple[FakeApi, str]:
    fake = FakeApi()
    app = web.Application()
    app.router.add_post("/api/v1/imports", fake.register)
    app.router.add_get("/api/v1/imports", fake.listing)
    app.router.add_delete("/api/v1/imports/{source}/{id:.*}", fake.delete)
    server = await aiohttp_server(app)
    return fake, str(server.make_url("")).rstrip("/")


async def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    # The client blocks (urllib): off the loop that serves the fake API.
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def test_track_sends_the_token_and_says_new_or_already(
    api: tuple[FakeApi, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fake, url = api
    token_file = tmp_path / "token"
    token_file.write_text(f"# the pipeline's token\n{TOKEN}\n")
    args = ["track", "--source", "shop", "--id", "2002", "--name", "nightly", "--url", url]
    code, out, err = await run(capsys, *args, "--token-file", str(token_file))
    assert (code, out, err) == (0, "tracking shop/2002 (new)\n", "")
    method, path, auth, body = fake.seen[-1]
    assert (method, path, auth) == ("POST", "/api/v1/imports", f"Bearer {TOKEN}")
    assert body == {"source": "shop", "id": "2002", "name": "nightly"}
    code, out, _ = await run(capsys, *args, "--token-file", str(token_file))
    assert (code, out) == (0, "tracking shop/2002 (already tracked)\n")
    assert TOKEN not in out


async def test_untrack_quotes_the_id_in_the_path(
    api: tuple[FakeApi, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, url = api
    monkeypatch.setenv("IMPORT_STATUS_EXPORTER_TOKEN", TOKEN)
    code, out, _ = await run(capsys, "untrack", "--source", "shop", "--id", "a:b@c", "--url", url)
    assert (code, out) == (0, "stopped tracking shop/a:b@c\n")
    assert fake.seen[-1][:3] == ("DELETE", "/api/v1/imports/shop/a%3Ab%40c", f"Bearer {TOKEN}")


async def test_a_refusal_is_exit_1_with_the_exporters_words(
    api: tuple[FakeApi, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = api
    code, out, err = await run(capsys, "track", "--source", "full", "--id", "1", "--url", url)
    assert (code, out) == (1, "")
    assert err == "import-status-exporter: track full/1: 409: source 'full' tracks 10000 imports\n"


async def test_list_follows_the_pages(
    api: tuple[FakeApi, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = api
    code, out, _ = await run(capsys, "list", "--url", url)
    assert code == 0
    assert out.splitlines() == ["shop\t1\trunning\t", "shop\t2\trunning\t"]


async def test_an_exporter_out_of_reach_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:

    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = await run(capsys, "track", "--source", "s", "--id", "1", "--url", url)
    assert code == 1
    assert err.startswith(f"import-status-exporter: cannot reach {url}: ")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--url", "localhost:10451"], "--url 'localhost:10451': expected http://host:port"),
        (["--token-file", "/nonexistent/token"], "--token-file: cannot read /nonexistent/token"),
        (["--ca-file", "ca.pem"], "--ca-file and --cert-file need an https:// --url"),
    ],
)
async def test_usage_errors_are_exit_2_and_name_the_flag(
    capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    code, _, err = await run(capsys, "track", "--source", "s", "--id", "1", *args)
    assert code == 2
    assert says in err
