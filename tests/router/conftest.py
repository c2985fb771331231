"""Fixtures of the router tests: a real `python -m glmserve.router` process on a real socket.

`router_url` (session) is a router that names one prefill and one decode worker that do not exist (generation
answers 503), which is what validation tests want: they must fail before dispatch.
"""

from __future__ import annotations

import contextlib

import pytest

from router_fixtures import RouterProc, absent_workers, peer_fleet


@pytest.fixture(scope="session")
def router_url():
    r = RouterProc([*absent_workers(), "--max_req_total_len", "256", "--max_body_bytes", "65536"])
    yield r.url
    r.stop()


@pytest.fixture
def fleet():
    """fleet(**kw) -> (router, peer, tokenizer): a router wired to a scripted protocol peer."""
    with contextlib.ExitStack() as stack:
        def make(reply: str = "Hello world. STOP here, then more text follows.", **kw):
            return stack.enter_context(peer_fleet(reply, **kw))

        yield make
