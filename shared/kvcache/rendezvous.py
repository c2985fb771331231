"""Builds KV links: TCPStore rendezvous, signature check, process group, warm-up.

Runs in every prefill and decode worker rank. The decode leader hosts one TCPStore on
--link_port (`open_store(host, port, is_host=True)`); its TP followers and every prefill rank
connect to it as clients (`is_host=False`). Each (prefill, decode, TP rank) pair uses keys under
the pair-unique base `kvlink/{prefill_id}->{decode_id}/r{tp_rank}`; each connection attempt
gets a fresh prefix `{base}/a{attempt}`, so a link can be torn down and rebuilt any number of
times over the same store, and several links live in one process (no init_process_group).

Protocol (both calls block; run them off the worker's main loop, e.g. with `in_background`):
- prefill: `connect_link(...)` takes attempt = store.add(f"{base}/attempt", 1) (a new attempt
  every call).
- decode: `accept_link(...)` waits until `{base}/attempt` exceeds the attempt it joined last
  (`{base}/joined`), then joins that newest attempt.
- both: write their LinkSignature as JSON under `{prefix}/sig/{role}`, wait for the peer's and
  refuse (LinkMismatch, on BOTH ends) when any field differs, naming every differing field:
  "KV link p0->d0/r0 refused: page_size differs (prefill 16, decode 32)".
- both: write where they run (`{prefix}/where/{role}`: host, GPU uuid, asked transport) and pick
  the same transport (`pick_transport`): "ipc" (ipc_link.py: the decode maps the prefill's cache,
  one device copy per push) when asked, or under "auto" when both ranks use the same GPU (NCCL
  refuses two ranks on one device); else "pg".
- "pg": a two-party ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA) over
  PrefixStore(f"{prefix}/pg", store), rank 0 = prefill, 1 = decode. "ipc": the prefill publishes
  its control block's name and its cache's handle under `{prefix}/ipc`; the decode maps both.
- then one small warm-up transfer (NCCL sets its communicator up on the first op: do it here,
  not on a request's path).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.kvcache.link import KVLink, LinkError, LinkMismatch, LinkSignature, LinkStats, XferState
from glmserve.shared.kvcache.peer_signal import PeerSignal
from glmserve.shared.kvcache.pg_link import RECEIVER, SENDER, PGLink
from glmserve.shared.ports import hosted_store

T = TypeVar("T")
WARM_XFER = "__warm__"
GROUP_TIMEOUT_SLACK_S = 30.0


def open_store(host: str, port: int, is_host: bool, timeout_s: float = 30.0) -> dist.TCPStore:
    """The decode leader hosts (is_host=True, listens on host:port only); everyone else connects."""
    if is_host:
        return hosted_store(host, port, timeout_s)
    return dist.TCPStore(
        host, port, None, False, datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )


def link_base(prefill_id: str, decode_id: str, tp_rank: int) -> str:
    return f"kvlink/{prefill_id}->{decode_id}/r{tp_rank}"


TRANSPORTS = ("auto", "nccl", "gloo", "cuda_ipc", "ipc")  # --kv_transport; cuda_ipc == ipc


def connect_link(
    store: dist.Store, prefill_id: str, decode_id: str, tp_rank: int, signature: LinkSignature,
    device: torch.device | str, timeout_s: float = 30.0, xfer_timeout_s: float = 60.0,
    transport: str = "auto", cache: PagedKVCache | None = None,
) -> KVLink:
    """Prefill side: start a new attempt and join it (blocks until the decode joined or timeout).
    cache: this rank's KV cache (the ipc transport shares it with the decode)."""
    base = link_base(prefill_id, decode_id, tp_rank)
    attempt = store.add(f"{base}/attempt", 1)
    return _join(store, base, attempt, SENDER, signature, device, timeout_s, xfer_timeout_s, transport, cache)


def accept_link(
    store: dist.Store, prefill_id: str, decode_id: str, tp_rank: int, signature: LinkSignature,
    device: torch.device | str, timeout_s: float = 30.0, xfer_timeout_s: float = 60.0,
    transport: str = "auto", cache: PagedKVCache | None = None,
) -> KVLink:
    """Decode side: wait for the prefill's newest unjoined attempt and join it."""
    base = link_base(prefill_id, decode_id, tp_rank)
    attempt = _await_attempt(store, base, timeout_s)
    store.set(f"{base}/joined", str(attempt))
    return _join(store, base, attempt, RECEIVER, signature, device, timeout_s, xfer_timeout_s, transport, cache)


def where(device: torch.device, transport: str) -> dict:
    """What the transport choice needs to know about one end."""
    gpu = ""
    if device.type == "cuda":
        try:
            gpu = str(torch.cuda.get_device_properties(device).uuid)
        except (AttributeError, RuntimeError):
            gpu = f"index {device.index}"
    return {"host": socket.gethostname(), "gpu": gpu, "transport": "ipc" if transport == "cuda_ipc" else transport}


def pick_transport(prefill: dict, decode: dict) -> str:
    """"ipc" or "pg" for this pair (the same answer on both ends), or LinkMismatch."""
    asked = {prefill["transport"], decode["transport"]} - {"auto"}
    if len(asked) > 1:
        raise LinkMismatch(f"kv_transport differs (prefill {prefill['transport']}, decode {decode['transport']})")
    same_host = prefill["host"] == decode["host"]
    if asked == {"ipc"}:
        if not same_host:
            raise LinkMismatch(f"kv_transport ipc needs one host (prefill on {prefill['host']}, decode on "
                               f"{decode['host']})")
        return "ipc"
    if not asked and same_host and prefill["gpu"] and prefill["gpu"] == decode["gpu"]:
        return "ipc"  # one GPU: NCCL refuses two ranks on one device
    if asked == {"nccl"} and not prefill["gpu"]:
        raise LinkMismatch("kv_transport nccl needs CUDA devices")
    if asked == {"gloo"} and prefill["gpu"]:
        raise LinkMismatch("kv_transport gloo carries CPU caches only (use nccl or cuda_ipc on GPUs)")
    return "pg"


def _await_attempt(store: dist.Store, base: str, timeout_s: float) -> int:
    end = time.monotonic() + timeout_s
    joined = int(store.get(f"{base}/joined")) if store.check([f"{base}/joined"]) else 0
    while (attempt := store.add(f"{base}/attempt", 0)) <= joined:
        if time.monotonic() > end:
            raise LinkError(f"KV link {base}: no connection attempt from the prefill within {timeout_s:g} s")
        time.sleep(0.01)
    return attempt


def _join(
    store: dist.Store, base: str, attempt: int, rank: int, signature: LinkSignature,
    device: torch.device | str, timeout_s: float, xfer_timeout_s: float, transport: str = "auto",
    cache: PagedKVCache | None = None,
) -> KVLink:
    prefix = f"{base}/a{attempt}"
    role, peer = ("prefill", "decode") if rank == SENDER else ("decode", "prefill")
    name = base.removeprefix("kvlink/")
    store.set(f"{prefix}/sig/{role}", json.dumps(signature.to_json_dict()))
    try:
        store.wait([f"{prefix}/sig/{peer}"], datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - DistStoreError / RuntimeError by torch version
        raise LinkError(f"KV link {name}: the {peer} did not join within {timeout_s:g} s ({e})") from e
    theirs = LinkSignature(**json.loads(store.get(f"{prefix}/sig/{peer}")))
    prefill_sig, decode_sig = (signature, theirs) if rank == SENDER else (theirs, signature)
    diffs = prefill_sig.differences(decode_sig, "prefill", "decode")  # same text on both ends
    if diffs:
        raise LinkMismatch(f"KV link {name} refused: " + "; ".join(diffs))
    store.set(f"{prefix}/where/{role}", json.dumps(where(torch.device(device), transport)))
    store.wait([f"{prefix}/where/{peer}"], datetime.timedelta(seconds=timeout_s))
    ends = {r: json.loads(store.get(f"{prefix}/where/{r}")) for r in ("prefill", "decode")}
    try:
        kind = pick_transport(ends["prefill"], ends["decode"])
    except LinkMismatch as e:
        raise LinkMismatch(f"KV link {name} refused: {e}") from None
    if kind == "ipc":
        link = _ipc_link(store, prefix, rank, name, torch.device(device), xfer_timeout_s, timeout_s, cache)
    else:
        pg = _make_group(dist.PrefixStore(f"{prefix}/pg", store), rank, torch.device(device), xfer_timeout_s)
        link = PGLink(pg, rank, name, device, xfer_timeout_s, PeerSignal(store, prefix, role, peer))
    _warm(link, timeout_s)
    return link


def _ipc_link(store: dist.Store, prefix: str, rank: int, name: str, device: torch.device, xfer_timeout_s: float,
              timeout_s: float, cache: PagedKVCache | None) -> KVLink:
    """The prefill shares its control block and cache; the decode maps them (ipc_link.py)."""
    from glmserve.shared.kvcache.ipc_link import ControlBlock, IPCLink
    from glmserve.shared.kvcache.ipc_map import export_buffer, open_buffer

    key = f"{prefix}/ipc"
    if rank == SENDER:
        if cache is None:
            raise LinkError(f"KV link {name}: the ipc transport needs the prefill's cache")
        ctrl = ControlBlock()
        store.set(key + "/ctrl", ctrl.name.encode())
        store.set(key + "/cache", export_buffer(cache.buffer))
        return IPCLink(SENDER, name, device, xfer_timeout_s, ctrl)
    store.wait([key + "/ctrl", key + "/cache"], datetime.timedelta(seconds=timeout_s))
    ctrl = ControlBlock(store.get(key + "/ctrl").decode())
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        peer_cache = open_buffer(store.get(key + "/cache"))
    return IPCLink(RECEIVER, name, device, xfer_timeout_s, ctrl, peer_cache)


def _make_group(store: dist.Store, rank: int, device: torch.device, xfer_timeout_s: float):
    # the group's own timeout stays well past the link's deadline: our poll() tears the link down
    # first (NCCL's watchdog would otherwise kill the whole process on a timed-out op), and gloo
    # waiter threads stuck on a torn-down group exit at this timeout
    timeout = datetime.timedelta(seconds=xfer_timeout_s + GROUP_TIMEOUT_SLACK_S)
    if device.type != "cuda":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    if os.environ.get("KVLINK_NCCL_BLOCKING", "0") != "1":
        # a nonblocking communicator: no host thread ever sits inside an NCCL call, so
        # ncclCommAbort (teardown) can always run and makes the blocked op return
        opts.config.blocking = False
        os.environ.setdefault("TORCH_NCCL_NONBLOCKING_TIMEOUT", str(int(xfer_timeout_s + GROUP_TIMEOUT_SLACK_S)))
    # TORCH_NCCL_ASYNC_ERROR_HANDLING is read when the group is built: 0 for the link's group, so
    # NCCL's watchdog never kills the worker over a link op (the link's deadlines handle them)
    with _env("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0"), torch.cuda.device(device):
        pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
        eager = getattr(pg, "eager_connect_single_device", None)
        if eager is not None:  # set the communicator up now, both ends are here
            eager(device)
    return pg


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _warm(link: KVLink, timeout_s: float) -> None:
    """One 8-byte transfer prefill -> decode: both ends are connected when it completes."""
    t = torch.zeros(2, dtype=torch.int32, device=link.device)
    xfer_timeout_s, link.timeout_s = link.timeout_s, timeout_s  # the warm-up gets the connect deadline
    try:
        if link.rank == SENDER:
            link.send_tensor(WARM_XFER, t)
        else:
            link.recv_tensor(WARM_XFER, t)
    finally:
        link.timeout_s = xfer_timeout_s
    state = link.wait(WARM_XFER, timeout_s)
    link.forget(WARM_XFER)
    link.stats = LinkStats()  # count request traffic only
    if state is not XferState.DONE:
        link.teardown(f"warm-up {state.value}")
        raise LinkError(f"KV link {link.name}: warm-up transfer {state.value} ({link.error})")


def in_background(fn: Callable[..., T], *args, **kwargs) -> concurrent.futures.Future[T]:
    """Run a blocking call (connect_link / accept_link) in a daemon thread; poll the future."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(e)

    threading.Thread(target=run, name=f"kvlink {getattr(fn, '__name__', 'call')}", daemon=True).start()
    return fut


_HOSTED: dict[int, dist.TCPStore] = {}  # port -> the store this process hosts (decode leader)
_HOSTED_LOCK = threading.Lock()


def host_store(port: int, host: str = "127.0.0.1", timeout_s: float = 30.0) -> dist.TCPStore:
    """The decode leader's link store on --link_port, created once per process (call at start)."""
    with _HOSTED_LOCK:
        if port not in _HOSTED:
            _HOSTED[port] = open_store(host, port, is_host=True, timeout_s=timeout_s)
        return _HOSTED[port]


def open_link(
    role: str, host: str, port: int, prefill_id: str, decode_id: str, tp_rank: int,
    signature: LinkSignature, device: torch.device | str, is_server: bool = False,
    timeout_s: float = 30.0, xfer_timeout_s: float = 60.0,
) -> PGLink:
    """One call for workers: role "prefill" connects, role "decode" accepts (blocking).

    is_server: this process hosts the store (decode leader; `host_store(port)` is reused, so any
    number of links share it). Everyone else gets a fresh client connection per link, so a
    restarted decode (new store) is reached without stale state."""
    store = host_store(port) if is_server else open_store(host, port, is_host=False, timeout_s=timeout_s)
    fn = connect_link if role == "prefill" else accept_link
    return fn(store, prefill_id, decode_id, tp_rank, signature, device, timeout_s, xfer_timeout_s)
