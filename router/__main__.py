"""`python -m router ...`: parse flags, build the app, serve it with uvicorn (binds 127.0.0.1
unless --host says otherwise).

Runs as the router process.
"""

from __future__ import annotations

import logging

import uvicorn

from router.app import build_app
from router.config import parse_config


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    app = build_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5,
                h11_max_incomplete_event_size=64 * 1024)


if __name__ == "__main__":
    main()
