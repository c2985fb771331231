"""Every control message on ZeroMQ (router <-> workers, prefill <-> decode leaders).

Messages are msgspec Structs in one tagged union, encoded as msgpack. Each carries the
protocol version; a peer speaking another version is rejected by `decode`. Token ids
travel as packed little-endian int32 bytes (`pack_ids` / `unpack_ids`). One request id
(`rid`), issued by the router, keys every message and KV transfer of a request; with
n > 1 the router issues one rid per choice.

Sockets (all addresses come from config):
- router binds one PULL socket ("events"); every worker leader connects a PUSH to it.
- every worker leader binds one PULL socket ("control"); the router, and for a decode
  leader also its prefill peers, connect PUSH sockets to it.
"""

from __future__ import annotations

import array
import sys
from typing import Union

import msgspec

PROTOCOL_VERSION = 2  # 2: the first token left KVChunkReady for FirstToken


def pack_ids(ids: list[int]) -> bytes:
    a = array.array("i", ids)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def unpack_ids(data: bytes) -> list[int]:
    a = array.array("i")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


class Msg(msgspec.Struct, tag=True, kw_only=True, array_like=False):
    version: int = PROTOCOL_VERSION


class SamplingParams(msgspec.Struct, kw_only=True):
    """Per-request sampling; validated by the router before it is sent."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 16
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


# ---- router -> decode leader ---------------------------------------------------------
class Reserve(Msg):
    """Reserve pages for prompt + allowance before the prefill ends; answered by Reserved or Busy."""

    rid: str
    prompt_ids: bytes  # packed int32 (needed for penalties and the MTP draft inputs)
    sampling: SamplingParams
    prefill_id: str  # worker id of the prefill leader that will push the KV


# ---- router -> prefill leader --------------------------------------------------------
class PrefillRequest(Msg):
    rid: str
    prompt_ids: bytes  # packed int32
    sampling: SamplingParams
    decode_id: str
    decode_page_ids: bytes  # packed int32, the pages the decode worker reserved
    decode_link_epoch: int = 0  # Reserved.link_epoch, relayed: the prefill checks its link is that one


# ---- router -> any worker leader -----------------------------------------------------
class Abort(Msg):
    rid: str
    reason: str = "abort"


# ---- decode leader -> router ---------------------------------------------------------
class Reserved(Msg):
    rid: str
    decode_id: str
    page_ids: bytes  # packed int32
    link_epoch: int = 0  # epoch of the decode's live KV link with the request's prefill; with none, the
    # decode's epoch floor (its start id: every link it builds later has a larger epoch). A prefill
    # whose link epoch is smaller holds a link from before a decode restart or rebuild: stale.


class Busy(Msg):
    rid: str
    decode_id: str
    reason: str


# ---- any worker leader -> router -----------------------------------------------------
class TokenEvent(Msg):
    """New tokens of one request. `finished` is set on the last event of the request."""

    rid: str
    worker_id: str
    token_ids: bytes  # packed int32, may hold several tokens (MTP)
    logprobs: list[float] = []  # one per token when requested
    top_logprobs: list[list[tuple[int, float]]] = []  # per token: (id, logprob) pairs
    finished: bool = False
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error"


class RequestError(Msg):
    """A request failed on a worker; the router ends it with an error (or re-runs it)."""

    rid: str
    worker_id: str
    message: str
    retryable: bool = False  # true when no token of it was produced


class WorkerStatus(Msg):
    """Periodic heartbeat; the router's dispatch and liveness read it."""

    worker_id: str
    role: str  # "prefill" | "decode"
    ready: bool
    queued_tokens: int = 0
    running: int = 0
    free_pages: int = 0
    total_pages: int = 0
    used_pages: int = 0
    tp_size: int = 1
    instance: str = ""  # unique per worker process start: a change tells the router it restarted


# ---- prefill leader -> decode leader (KV bytes go over the KVLink, not here) ---------
class KVChunkReady(Msg):
    """Announces the next KV push of `rid` on the pair's KVLink (posted in this order).

    Sent as soon as the push is posted on the prefill's link, before the step's sampling: the
    decode posts the matching recv without waiting for anything else the prefill does (an NCCL
    send otherwise spins until a recv the decode only posts after the prefill's next host sync)."""

    rid: str
    prefill_id: str
    page_ids: bytes  # packed int32: the decode-side pages this push fills
    num_tokens: int  # prompt tokens covered so far
    is_last: bool = False  # a FirstToken follows (unless aborted)
    chunk_index: int = 0  # 0, 1, 2 ... per rid; the KVLink transfer id is f"{rid}/{chunk_index}"
    has_hidden: bool = False  # the last push also sends the final hidden state [hidden] (MTP seed)
    aborted: bool = False  # no KV follows (page_ids empty); the prefill gave this request up
    link_epoch: int = 0  # LinkInfo.generation of the link the push was posted on; the decode drops
    # pushes of any other epoch (posted on a link its current one replaced: no data follows here)


class FirstToken(Msg):
    """After the last push of `rid`: the token the prefill sampled (already sent to the router).
    The decode starts the request once this and every announced push have arrived."""

    rid: str
    prefill_id: str
    token_id: int
    finished: bool = False  # the first token already ended the request (the prefill sent finished)


# ---- prefill leader <-> decode leader: KV-link rendezvous ---------------------------
class LinkHello(Msg):
    """Prefill leader -> decode leader at start (and after a link failure): asks for link info.

    The decode answers with LinkInfo on a PUSH it connects to `reply_addr` (the prefill's
    control address)."""

    prefill_id: str
    reply_addr: str
    tp_size: int = 1
    generation: int = 0  # the prefill process's start id; a new one makes the decode relink


class LinkInfo(Msg):
    """Decode leader -> prefill leader: where the decode's KV-link TCPStore listens."""

    decode_id: str
    link_host: str
    link_port: int
    tp_size: int = 1
    page_size: int = 16
    num_layers: int = 0
    generation: int = 0  # link epoch of this (prefill, decode) pair; a new one means "connect now"
    reply_to: int = 0  # the LinkHello.generation this answers (a prefill ignores stale answers)


Message = Union[
    Reserve,
    PrefillRequest,
    Abort,
    Reserved,
    Busy,
    TokenEvent,
    RequestError,
    WorkerStatus,
    KVChunkReady,
    FirstToken,
    LinkHello,
    LinkInfo,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ProtocolError(ValueError):
    pass


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Msg:
    try:
        msg = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"bad message: {e}") from e
    if msg.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {msg.version} != {PROTOCOL_VERSION}")
    return msg
