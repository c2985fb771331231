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

Authentication: every frame is HMAC-SHA256(fleet key, msgpack body) + body. The fleet key is
one secret per fleet (fleet_key.py: `deploy up` writes it 0600 and passes its path in
GLMSERVE_FLEET_KEY_FILE); a frame without the right tag is dropped by `decode`, so a process
that can reach a port but not the key can neither inject tokens nor steer workers. Every field
is range-checked by msgspec constraints at decode, before any handler sees it.
"""

from __future__ import annotations

import array
import hashlib
import hmac
import sys
from typing import Annotated, Literal, Union

import msgspec

from glmserve.shared.fleet_key import fleet_key

PROTOCOL_VERSION = 4  # 4: TokenEvents; 3: HMAC-tagged frames, constrained fields; 2: FirstToken
TAG_BYTES = 32  # HMAC-SHA256
MAX_FRAME_BYTES = 128 * 2**20  # ZMQ_MAXMSGSIZE of every receiving socket: a larger frame drops the peer

# Field bounds, checked at decode. Structural limits only; model limits (vocab, positions) are
# checked by the worker's check_request against its own config.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]  # request ids (router: prefix + hex + attempt)
WorkerId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]  # reasons, error messages
Addr = Annotated[str, msgspec.Meta(pattern=r"^tcp://[A-Za-z0-9.\-:\[\]]{1,255}:[0-9]{1,5}$")]
Host = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9.\-:\[\]]{1,255}$")]
I32 = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]  # token ids, counts, indices
U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # epochs, generations, seeds
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
TP = Annotated[int, msgspec.Meta(ge=1, le=1024)]
Ids = Annotated[bytes, msgspec.Meta(max_length=4 * 2**24)]  # packed int32, at most 16 M ids
Ratio = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Logprob = Annotated[float, msgspec.Meta(le=0.0)]
FinishReason = Literal["length", "stop", "abort", "error"]


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
    """Per-request sampling; validated by the router before it is sent (same bounds)."""

    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 1.0  # 0 = greedy
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)] = -1  # -1 = off; <= vocab (check_request)
    min_p: Ratio = 0.0
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 1.0
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] = 16
    stop_token_ids: Annotated[list[I32], msgspec.Meta(max_length=1024)] = []
    ignore_eos: bool = False
    seed: U63 | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0


# ---- router -> decode leader ---------------------------------------------------------
class Reserve(Msg):
    """Reserve pages for prompt + allowance before the prefill ends; answered by Reserved or Busy."""

    rid: Id
    prompt_ids: Ids  # packed int32 (needed for penalties and the MTP draft inputs)
    sampling: SamplingParams
    prefill_id: WorkerId  # worker id of the prefill leader that will push the KV


# ---- router -> prefill leader --------------------------------------------------------
class PrefillRequest(Msg):
    rid: Id
    prompt_ids: Ids  # packed int32
    sampling: SamplingParams
    decode_id: WorkerId
    decode_page_ids: Ids  # packed int32, the pages the decode worker reserved
    decode_link_epoch: U63 = 0  # Reserved.link_epoch, relayed: the prefill checks its link is that one


# ---- router -> any worker leader -----------------------------------------------------
class Abort(Msg):
    rid: Id
    reason: Text = "abort"


# ---- decode leader -> router ---------------------------------------------------------
class Reserved(Msg):
    rid: Id
    decode_id: WorkerId
    page_ids: Ids  # packed int32
    link_epoch: U63 = 0  # epoch of the decode's live KV link with the request's prefill; with none, the
    # decode's epoch floor (its start id: every link it builds later has a larger epoch). A prefill
    # whose link epoch is smaller holds a link from before a decode restart or rebuild: stale.


class Busy(Msg):
    rid: Id
    decode_id: WorkerId
    reason: Text


# ---- any worker leader -> router -----------------------------------------------------
class TokenEvent(Msg):
    """New tokens of one request. `finished` is set on the last event of the request."""

    rid: Id
    worker_id: WorkerId
    token_ids: Annotated[bytes, msgspec.Meta(max_length=4 * 4096)]  # packed int32, several tokens (MTP)
    logprobs: Annotated[list[Logprob], msgspec.Meta(max_length=4096)] = []  # one per token when requested
    # per token: (id, logprob) pairs
    top_logprobs: Annotated[list[Annotated[list[tuple[I32, Logprob]], msgspec.Meta(max_length=64)]],
                            msgspec.Meta(max_length=4096)] = []
    finished: bool = False
    finish_reason: FinishReason | None = None


MAX_BATCHED_EVENTS = 1024  # TokenEvents per frame (a decode step with more sends several frames)


class TokenEvents(Msg):
    """The TokenEvents of one decode step, in one frame: one msgpack encode, one HMAC and one ZeroMQ
    send per step instead of per request (a step of 256 requests: 256 -> 1 on the decode's loop and
    in the router's receive loop). The router handles them in order, as if sent one by one."""

    events: Annotated[list[TokenEvent], msgspec.Meta(min_length=1, max_length=MAX_BATCHED_EVENTS)]


def unbatch(msg: "Msg") -> "list[Msg] | tuple[Msg]":
    """The messages a frame carries: a TokenEvents' events, else the message itself."""
    return msg.events if isinstance(msg, TokenEvents) else (msg,)


class RequestError(Msg):
    """A request failed on a worker; the router ends it with an error (or re-runs it)."""

    rid: Id
    worker_id: WorkerId
    message: Text
    retryable: bool = False  # true when no token of it was produced


class WorkerStatus(Msg):
    """Periodic heartbeat; the router's dispatch and liveness read it."""

    worker_id: WorkerId
    role: Literal["prefill", "decode"]
    ready: bool
    queued_tokens: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    running: I32 = 0
    free_pages: I32 = 0
    total_pages: I32 = 0
    used_pages: I32 = 0
    tp_size: TP = 1
    instance: Annotated[str, msgspec.Meta(max_length=128)] = ""  # unique per worker process start: a change tells the router it restarted


# ---- prefill leader -> decode leader (KV bytes go over the KVLink, not here) ---------
class KVChunkReady(Msg):
    """Announces the next KV push of `rid` on the pair's KVLink (posted in this order).

    Sent as soon as the push is posted on the prefill's link, before the step's sampling: the
    decode posts the matching recv without waiting for anything else the prefill does (an NCCL
    send otherwise spins until a recv the decode only posts after the prefill's next host sync)."""

    rid: Id
    prefill_id: WorkerId
    page_ids: Ids  # packed int32: the decode-side pages this push fills
    num_tokens: I32  # prompt tokens covered so far
    is_last: bool = False  # a FirstToken follows (unless aborted)
    chunk_index: I32 = 0  # 0, 1, 2 ... per rid; the KVLink transfer id is f"{rid}/{chunk_index}"
    has_hidden: bool = False  # the last push also sends the final hidden state [hidden] (MTP seed)
    aborted: bool = False  # no KV follows (page_ids empty); the prefill gave this request up
    link_epoch: U63 = 0  # LinkInfo.generation of the link the push was posted on; the decode drops
    # pushes of any other epoch (posted on a link its current one replaced: no data follows here)


class FirstToken(Msg):
    """After the last push of `rid`: the token the prefill sampled (already sent to the router).
    The decode starts the request once this and every announced push have arrived."""

    rid: Id
    prefill_id: WorkerId
    token_id: I32
    finished: bool = False  # the first token already ended the request (the prefill sent finished)


# ---- prefill leader <-> decode leader: KV-link rendezvous ---------------------------
class LinkHello(Msg):
    """Prefill leader -> decode leader at start (and after a link failure): asks for link info.

    The decode answers with LinkInfo on a PUSH it connects to `reply_addr` (the prefill's
    control address)."""

    prefill_id: WorkerId
    reply_addr: Addr
    tp_size: TP = 1
    generation: U63 = 0  # the prefill process's start id; a new one makes the decode relink


class LinkInfo(Msg):
    """Decode leader -> prefill leader: where the decode's KV-link TCPStore listens."""

    decode_id: WorkerId
    link_host: Host
    link_port: Port
    tp_size: TP = 1
    page_size: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 16
    num_layers: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    generation: U63 = 0  # link epoch of this (prefill, decode) pair; a new one means "connect now"
    reply_to: U63 = 0  # the LinkHello.generation this answers (a prefill ignores stale answers)


Message = Union[
    Reserve,
    PrefillRequest,
    Abort,
    Reserved,
    Busy,
    TokenEvent,
    TokenEvents,
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


def _tag(body: bytes) -> bytes:
    return hmac.new(fleet_key(), body, hashlib.sha256).digest()


def encode(msg: Msg) -> bytes:
    """One frame: HMAC tag (32 bytes) + msgpack body."""
    body = _encoder.encode(msg)
    return _tag(body) + body


def decode(data: bytes) -> Msg:
    """The message of a frame; ProtocolError if its tag, encoding, version or any field is bad."""
    tag, body = data[:TAG_BYTES], data[TAG_BYTES:]
    if len(data) <= TAG_BYTES or not hmac.compare_digest(tag, _tag(body)):
        raise ProtocolError("bad message: not signed with this fleet's key")
    try:
        msg = _decoder.decode(body)
    except msgspec.DecodeError as e:  # ValidationError included: a field out of its bounds
        raise ProtocolError(f"bad message: {e}") from e
    if msg.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {msg.version} != {PROTOCOL_VERSION}")
    return msg
