"""`python -m glmserve.router ...`: parse flags, build the app, serve it with uvicorn (binds 127.0.0.1
unless --host says otherwise).

Runs as the router process.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from glmserve.router.app import build_app
from glmserve.router.config import parse_config
from glmserve.router.http_protocol import BoundedHttpToolsProtocol
from glmserve.shared.fleet_key import FleetKeyError, fleet_key


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    try:
        fleet_key()  # every message to and from the workers is signed with it
    except FleetKeyError as e:
        sys.exit(f"router: {e}")
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    app = build_app(cfg)
    # Headers: at most 64 KiB per request head (http_protocol.py); an idle keep-alive connection closes
    # after 5 s. Bodies: read_body's --body_timeout_s. Planning (template, tokenizer) runs off the loop.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5,
                http=BoundedHttpToolsProtocol, loop="uvloop", timeout_keep_alive=5)


if __name__ == "__main__":
    main()
