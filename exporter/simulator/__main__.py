"""``python -m exporter.simulator --listen 127.0.0.1:8089 --speed 1``"""

from __future__ import annotations

import argparse

from aiohttp import web

from exporter.simulator.app import Simulator, create_app


def main() -> None:
    parser = argparse.ArgumentParser(description="Simulator of the upstream import-status APIs")
    parser.add_argument("--listen", default="127.0.0.1:8089", help="host:port")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    parser.add_argument(
        "--rocketchat-rate-limit", type=int, default=None, help="calls per minute per route"
    )
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    simulator = Simulator(speed=args.speed, rocketchat_rate_limit=args.rocketchat_rate_limit)
    print(f"simulator listening on http://{args.listen}", flush=True)
    web.run_app(
        create_app(simulator), host=host or "127.0.0.1", port=int(port), print=None, access_log=None
    )


if __name__ == "__main__":
    main()
