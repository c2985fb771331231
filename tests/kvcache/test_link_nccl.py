"""NCCL KVLink between two processes on two GPUs: this process is the prefill on cuda:0, the
kv_peer.py process the decode on cuda:1. Same scenarios and checks as the gloo tests.

Run on a 2-GPU machine: `pytest -q -m gpu tests/kvcache/test_link_nccl.py`.
"""

import pytest
import torch

from . import kv_peer as P
from .test_link_gloo import Peer, run_abort, run_ordered, run_pages, run_timeout_rebuild, run_two_links

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]
DEV = "cuda:0"


@pytest.fixture(scope="module")
def peer():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    p = Peer(device="cuda:1")
    yield p
    p.stop()


def test_nccl_gqa_pages_and_hidden(peer):
    run_pages(peer, "gqa", P.GQA, seed=1, dev=DEV)


def test_nccl_mla_bf16_pages_and_hidden(peer):
    run_pages(peer, "mla", P.MLA, seed=2, dev=DEV)


def test_nccl_transfers_in_order(peer):
    run_ordered(peer, DEV)


def test_nccl_abort_and_discard(peer):
    run_abort(peer, DEV)


def test_nccl_timeout_teardown_rebuild(peer):
    run_timeout_rebuild(peer, DEV)


def test_nccl_two_links_one_process(peer):
    run_two_links(peer, DEV)
