"""--web.route-prefix / --web.external-url: every endpoint under a path, as
behind a reverse proxy that keeps the path, with the page's links relative."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import urljoin

import aiohttp
import pytest

from exporter.cli import build_parser
from exporter.demo import DEMO_API_TOKEN, start_demo_simulator
from exporter.runtime import Exporter
from exporter.web import normalize_route_prefix, route_prefix_of
from tests.conftest import wait_until

SPEED = 20.0


@pytest.fixture
async def exporter() -> AsyncIterator[Exporter]:
    async with start_demo_simulator(SPEED) as config:
        running = Exporter(config, "127.0.0.1:0", route_prefix="/tools/imports/")
        await running.start()
        try:
            yield running
        finally:
            await running.stop()


async def test_every_endpoint_is_under_the_prefix_and_the_links_follow(
    exporter: Exporter,
) -> None:
    base = f"http://127.0.0.1:{exporter.port}"
    async with aiohttp.ClientSession() as session:

        async def get(path: str) -> tuple[int, str]:
            async with session.get(base + path, allow_redirects=False) as response:
                return response.status, await response.text()

        await wait_until(lambda: exporter.state.ready(), timeout=20)
        status, text = await get("/tools/imports/metrics")
        assert status == 200
        assert "import_state{" in text
        assert (await get("/metrics"))[0] == 404
        assert (await get("/"))[0] == 404
        async with session.get(base + "/tools/imports", allow_redirects=False) as response:
            assert response.status == 302
            assert response.headers["Location"] == "/tools/imports/"
        status, page = await get("/tools/imports/")
        assert status == 200
        links = re.findall(r'href="([^"]+)"', page)
        assert links
        assert not [link for link in links if link.startswith("/")]
        for link in ("metrics", "-/healthy", "-/ready", "api/v1/imports"):
            assert link in links
            url = urljoin(base + "/tools/imports/", link)
            async with session.get(url) as response:
                assert response.status == 200, url
        # The API's own rules (bearer token, paths under /api/) hold under the prefix.
        async with session.post(
            base + "/tools/imports/api/v1/imports",
            json={"source": "elevate-demo", "id": "4711"},
            headers={"Authorization": f"Bearer {DEMO_API_TOKEN}"},
        ) as response:
            assert response.status == 201, await response.text()
        async with session.post(base + "/tools/imports/api/v1/imports", json={}) as response:
            assert response.status == 401


def test_route_prefix_defaults_to_the_external_urls_path() -> None:
    assert route_prefix_of("https://proxy.example.com/imports/") == "/imports"
    assert route_prefix_of("https://exporter.example.com") == ""
    assert route_prefix_of(None) == ""
    assert normalize_route_prefix("/") == ""
    args = build_parser().parse_args(
        ["--web.external-url=https://p.example.com/x/", "--web.route-prefix=/"]
    )
    assert (args.external_url, args.route_prefix) == ("https://p.example.com/x/", "/")
